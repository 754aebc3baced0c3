"""Chunked gated linear attention in plain XLA (the "xla" impl).

The sequence is cut into chunks of C tokens, each chunk into m sub-chunks of c tokens. Per chunk, with b the
within-chunk inclusive cumsum of the log gates (per channel, <= 0 and decreasing) and S_prev the state entering it,

    o_i = scale * [ (q_i * exp(b_i)) S_prev + sum_{j <= i in chunk} (sum_K q_i k_j exp(b_i - b_j)) v_j ]
    S_next = diag(exp(b_C)) S_prev + sum_j (k_j * exp(b_C - b_j))^T v_j.

Gates can be as low as -50 per token, so exp(b) alone under/overflows over a chunk: every exponential below has an
exponent <= 0 that is a difference b_i - b_j with i at or after j, and each is a factor of a true decay (it underflows
only where the decay does):

* Between sub-chunks s' < s the scores are one matmul of q_i exp(b_i - e_{s-1}) with
  k_j exp(e_{s'} - b_j) exp(e_{s-1} - e_{s'}), e_s being b at the end of sub-chunk s.
* Inside a sub-chunk they are exact: sum_K q_i k_j exp(b_i - b_j) over a [c, c, K] tensor, masked (to exp(-inf) = 0)
  above the diagonal before the exponential.

|b| reaches thousands with such gates, and an ulp of a float32 there is ~1e-4, so b is kept as an unevaluated sum
hi + lo (hi: exact cumsum of the gates rounded to a 2^-12 grid; lo: cumsum of the small remainders) and differences
are formed as (hi_i - hi_j) + (lo_i - lo_j): exact to about an ulp of the difference itself, which keeps the chunked
path within ~1e-7 of the token loop.

The sequence is processed in blocks of chunks by a `lax.scan` that carries the state from block to block. Inside a
block, the state increments of all its chunks are computed at once, a short scan over its chunks forms the states
entering them, and the chunk outputs (independent given those states) are computed at once. The block body is under
`jax.checkpoint` and reads its slice of the inputs itself, so the backward pass recomputes one block at a time and
keeps no per-token state: residuals are the inputs and one [K, V] state per block. Blocks are sized per backend
(`BLOCK_ELEMS`): on accelerators one block usually holds the whole sequence, on CPU blocks keep temporaries small.
Everything is accumulated in float32 whatever the input dtype.

Several GLA states sharing q, k, v and differing in gates (DSLA) run as one GLA of key dimension n * K: keys
repeated, gates concatenated, queries scaled by each state's output weight (`chunk_gla_multi`); the concatenation is
done per block.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dsla_jax.ops.utils import (
    backend,
    check_chunking,
    check_gla_shapes,
    group_queries,
    matmul_precision,
    pad_time,
    resolve_scale,
    ungroup_queries,
)

# Sub-chunk size c (tokens of an exact [c, c, K] block; must divide the chunk size) and the largest float32 element
# count of a block's biggest temporary (the [c, c, K] blocks of its chunks), per backend. Measured with
# `python -m bench.ops --tune`: c = 8 beat 16 and 32 on an H200 (B=1 H=32 D=128 T=8192 bf16, fused DSLA: fwd+bwd
# 27 ms vs 40 / 35 ms, forward 7.0 vs 7.9 / 9.7 ms) and 16 on the 2-core CPU (T=2048 fwd+bwd ~200 vs ~300 ms); on
# CPU, blocks of 2^22 elements ran fwd+bwd 2-3x faster than 2^20 and kept the temp memory at 130 MiB at T=8192
# (2^24: 394 MiB). The hi/lo cumsum below is exact while |cumsum of gates| < 2^12 within a chunk (gates averaging
# above -64 per token at C = 64); beyond that, exponents carry the rounding of a plain float32 cumsum of that size
# (~2e-4 absolute at |cumsum| ~ 8000), still with every exponent <= 0 and no NaN/Inf.
SUB_CHUNK = {"cpu": 8, "gpu": 8, "tpu": 8}
BLOCK_ELEMS = {"cpu": 1 << 22, "gpu": 1 << 28, "tpu": 1 << 28}

# Unroll factor of the scan over the chunks of a block, per backend (the [K, V] state updates are short). On an H200
# unroll 1, 8 and 32 were within noise of each other (T=8192, 16 chunks per block); 8 is kept on accelerators.
SCAN_UNROLL = {"cpu": 1, "gpu": 8, "tpu": 8}


def _einsum(spec: str, *xs: jax.Array) -> jax.Array:
    return jnp.einsum(spec, *xs, precision=matmul_precision())


# Gates are split as g = g_hi + g_lo with g_hi on a grid of 2^-12: cumsums of g_hi are exact in float32 while
# |cumsum| < 2^12 within a chunk (gates averaging above -64 per token), so differences of them are exact, and
# |g_lo| <= 2^-13 keeps the rounding error of cumsum(g_lo) negligible.
_GRID = 4096.0


def _cumsum(x: jax.Array, axis: int) -> jax.Array:
    """Inclusive cumsum along a short axis as a matmul with a triangle of ones (XLA's cumsum is a quadratic
    reduce-window, ~7x slower on CPU). Exact for the grid-rounded gates: every partial sum is representable."""
    n = x.shape[axis]
    tri = jnp.tril(jnp.ones((n, n), x.dtype))
    return jnp.moveaxis(jnp.tensordot(tri, jnp.moveaxis(x, axis, 0), axes=1, precision=matmul_precision()), 0, axis)


def cumsum_hi_lo(g: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Inclusive cumsum of `g` along `axis` as hi + lo: hi exact on a grid of 2^-12 (no gradient), lo small."""
    g_hi = jax.lax.stop_gradient(jnp.round(g * _GRID) / _GRID)
    return _cumsum(g_hi, axis), _cumsum(g - g_hi, axis)


def _exp_diff(x: tuple[jax.Array, jax.Array], y: tuple[jax.Array, jax.Array]) -> jax.Array:
    """exp(x - y) for hi/lo pairs (broadcasting); the caller guarantees x <= y."""
    return jnp.exp(jnp.minimum((x[0] - y[0]) + (x[1] - y[1]), 0.0))


def _chunk_outputs(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    hi: jax.Array,
    lo: jax.Array,
    s: jax.Array,
    *,
    scale: float,
    sub_chunk: int,
) -> jax.Array:
    """Outputs of a batch of chunks given the states entering them.

    Args:
        q: [n, Z, G, C, K] queries (Z = B * Hk).
        k: [n, Z, C, K] keys.
        v: [n, Z, C, V] values.
        hi, lo: [n, Z, C, K] within-chunk inclusive cumsum of the log gates (`cumsum_hi_lo`).
        s: [n, Z, K, V] state entering each chunk.

    Returns:
        [n, Z, G, C, V] float32 outputs.
    """
    n, Z, G, C, K = q.shape
    V = v.shape[-1]
    c = sub_chunk
    m = C // c
    zero = jnp.zeros((), hi.dtype)

    # Contribution of the state entering the chunk; exponent b_i <= 0.
    o = _einsum("nzgck,nzkv->nzgcv", q * _exp_diff((hi, lo), (zero, zero))[:, :, None], s)

    qs = q.reshape(n, Z, G, m, c, K)
    ks = k.reshape(n, Z, m, c, K)
    vs = v.reshape(n, Z, m, c, V)
    b = (hi.reshape(n, Z, m, c, K), lo.reshape(n, Z, m, c, K))

    if m > 1:
        e = (b[0][:, :, :, -1], b[1][:, :, :, -1])  # [n, Z, m, K] b at the end of each sub-chunk
        ref = tuple(jnp.concatenate([jnp.zeros_like(x[:, :, :1]), x[:, :, :-1]], axis=2) for x in e)  # e_{s-1}
        q_in = qs * _exp_diff(b, tuple(x[:, :, :, None] for x in ref))[:, :, None]  # b_i - e_{s-1} <= 0
        k_out = ks * _exp_diff(tuple(x[:, :, :, None] for x in e), b)  # e_{s'} - b_j <= 0
        # between[s, s'] = exp(e_{s-1} - e_{s'}) for s' < s, else 0.
        lower = jnp.tril(jnp.ones((m, m), bool), -1)[:, :, None]
        between = jnp.where(lower, _exp_diff(tuple(x[:, :, :, None] for x in ref), tuple(x[:, :, None] for x in e)), 0)
        k_rel = k_out[:, :, None] * between[:, :, :, :, None, :]  # [n, Z, s, s', c, K]
        scores = _einsum("nzgsik,nzstjk->nzgsitj", q_in, k_rel)
        o = o + _einsum("nzgsitj,nztjv->nzgsiv", scores, vs).reshape(n, Z, G, C, V)

    # Exact within-sub-chunk scores sum_K q_i k_j exp(b_i - b_j), j <= i.
    causal = jnp.tril(jnp.ones((c, c), bool))[:, :, None]
    diff = (b[0][:, :, :, :, None] - b[0][:, :, :, None]) + (b[1][:, :, :, :, None] - b[1][:, :, :, None])
    kd = ks[:, :, :, None] * jnp.exp(jnp.where(causal, jnp.minimum(diff, 0.0), -jnp.inf))  # [n, Z, m, i, j, K]
    diag = _einsum("nzgsik,nzsijk->nzgsij", qs, kd)
    o = o + _einsum("nzgsij,nzsjv->nzgsiv", diag, vs).reshape(n, Z, G, C, V)
    return scale * o


def _chunks_per_block(n_chunks: int, Z: int, G: int, C: int, c: int, K: int, block_elems: int | None) -> int:
    """How many chunks one block holds: as many as `block_elems` allows, preferring a divisor of `n_chunks`."""
    if block_elems is None:
        block_elems = BLOCK_ELEMS.get(backend(), BLOCK_ELEMS["gpu"])
    per_chunk = Z * max(G, 2) * C * c * K
    nb = max(1, min(n_chunks, block_elems // per_chunk))
    for d in range(nb, (nb + 1) // 2 - 1, -1):  # a divisor within a factor 2 avoids padding
        if n_chunks % d == 0:
            return d
    return nb


def chunk_gla_multi(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gates: tuple[jax.Array, ...],
    states: tuple[jax.Array, ...],
    weights: jax.Array | None,
    *,
    scale: float,
    chunk_size: int = 64,
    sub_chunk: int | None = None,
    block_elems: int | None = None,
    unroll: int | None = None,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Chunked GLA of n states sharing q, k, v, with output sum_i weights[i] * o_i; no shape checks.

    Args:
        q: [B, T, Hk, G, K] grouped queries, any float dtype.
        k: [B, T, Hk, K] keys.
        v: [B, T, Hk, V] values.
        gates: n log-gate arrays [B, T, Hk, K].
        states: n float32 initial states [B, Hk, K, V].
        weights: [n] output weights, or None for n = 1 (weight 1).
        scale: output scale.
        chunk_size: C; T is zero-padded to whole blocks of chunks (padded steps keep the state: g = k = v = 0).
        sub_chunk: c (a divisor of C is used, see `check_chunking`); default per backend, see `SUB_CHUNK`.
        block_elems: memory bound of a block, see `BLOCK_ELEMS`.
        unroll: unroll factor of the scan over chunks, see `SCAN_UNROLL`.

    Returns:
        o [B, T, Hk, G, V] float32 and the n final states [B, Hk, K, V] float32.
    """
    B, T, Hk, G, K = q.shape
    V = v.shape[-1]
    n = len(gates)
    nK = n * K
    if sub_chunk is None:
        sub_chunk = SUB_CHUNK.get(backend(), 8)
    c = check_chunking(chunk_size, sub_chunk)
    C = min(chunk_size, c * math.ceil(T / c))  # short sequences: one shorter chunk
    c = math.gcd(C, c)
    N = math.ceil(T / C)
    Z = B * Hk
    nb = _chunks_per_block(N, Z, G, C, c, nK, block_elems)
    nblk = math.ceil(N / nb)
    L = nb * C  # tokens per block
    f32 = jnp.float32
    q, k, v, *gates = (pad_time(x, nblk * L) for x in (q, k, v, *gates))
    w = None if weights is None else weights.astype(f32)
    if unroll is None:
        unroll = SCAN_UNROLL.get(backend(), 1)
    unroll = max(1, min(unroll, nb))

    def to_chunks(x: jax.Array) -> jax.Array:  # [B, L, Hk, D] -> [nb, Z, C, D]
        return x.reshape(B, nb, C, Hk, x.shape[-1]).transpose(1, 0, 3, 2, 4).reshape(nb, Z, C, x.shape[-1])

    def block(s: jax.Array, j: jax.Array) -> tuple[jax.Array, jax.Array]:
        """State entering block j [Z, nK, V] -> (state leaving it, outputs [B, L, Hk, G, V])."""

        def take(x):
            return jax.lax.dynamic_slice_in_dim(x, j * L, L, axis=1).astype(f32)

        qb, kb, vb = take(q), take(k), take(v)
        if w is not None:
            qb = jnp.concatenate([w[i] * qb for i in range(n)], axis=-1)
        qc = qb.reshape(B, nb, C, Hk, G, nK).transpose(1, 0, 3, 4, 2, 5).reshape(nb, Z, G, C, nK)
        kc = to_chunks(jnp.concatenate([kb] * n, axis=-1) if n > 1 else kb)
        gc = to_chunks(jnp.concatenate([take(g) for g in gates], axis=-1))
        vc = to_chunks(vb)

        hi, lo = cumsum_hi_lo(gc, axis=2)
        last = (hi[:, :, -1:], lo[:, :, -1:])
        # State increment of each chunk (exponent b_C - b_j <= 0) and the decay across it.
        incr = _einsum("nzck,nzcv->nzkv", kc * _exp_diff(last, (hi, lo)), vc)
        decay = jnp.exp(last[0] + last[1])[:, :, 0]  # [nb, Z, nK]

        def carry(s, xs):
            d, u = xs
            return d[..., None] * s + u, s

        s_out, s_enter = jax.lax.scan(carry, s, (decay, incr), unroll=unroll)
        o = _chunk_outputs(qc, kc, vc, hi, lo, s_enter, scale=scale, sub_chunk=c)  # [nb, Z, G, C, V]
        o = o.reshape(nb, B, Hk, G, C, V).transpose(1, 0, 4, 2, 3, 5).reshape(B, L, Hk, G, V)
        return s_out, o

    s0 = jnp.concatenate([x.astype(f32) for x in states], axis=-2).reshape(Z, nK, V)
    if nblk == 1:
        s_final, o = jax.checkpoint(block)(s0, jnp.zeros((), jnp.int32))
    else:
        s_final, o = jax.lax.scan(jax.checkpoint(block, prevent_cse=False), s0, jnp.arange(nblk))
        o = o.transpose(1, 0, 2, 3, 4, 5).reshape(B, nblk * L, Hk, G, V)
    s_final = s_final.reshape(B, Hk, nK, V)
    return o[:, :T], tuple(s_final[:, :, i * K : (i + 1) * K] for i in range(n))


def chunk_gla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    chunk_size: int = 64,
    sub_chunk: int | None = None,
    block_elems: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Chunked gated linear attention.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, Hk, K] keys; H % Hk == 0, query head h reads kv head h // (H // Hk).
        v: [B, T, Hk, V] values.
        g: [B, T, Hk, K] log forget gates (<= 0).
        scale: output scale, default K ** -0.5.
        initial_state: [B, Hk, K, V] float32 or None (zeros).
        chunk_size: C, tokens per chunk; T need not be a multiple.
        sub_chunk: c, tokens per exact diagonal block (a divisor of C is used); default per backend.
        block_elems: memory bound of the blocked output computation (default per backend).

    Returns:
        o [B, T, H, V] in q's dtype and the final state [B, Hk, K, V] float32.
    """
    B, T, H, Hk, K, V = check_gla_shapes(q, k, v, (g,), (initial_state,))
    scale = resolve_scale(scale, K)
    s0 = jnp.zeros((B, Hk, K, V), jnp.float32) if initial_state is None else initial_state
    o, (s,) = chunk_gla_multi(
        group_queries(q, Hk),
        k,
        v,
        (g,),
        (s0,),
        None,
        scale=scale,
        chunk_size=chunk_size,
        sub_chunk=sub_chunk,
        block_elems=block_elems,
    )
    return ungroup_queries(o).astype(q.dtype), s
