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

The chunk states (all chunks at once, then a `lax.scan` over chunks for the carried state) come first; the chunk
outputs, independent given the entering states, are computed in blocks of chunks under `jax.checkpoint`, so the
backward pass recomputes them block by block and keeps no per-token state: residuals are the inputs and one [K, V]
state per chunk. Everything is accumulated in float32 whatever the input dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dsla_jax.ops.utils import (
    PRECISION,
    backend,
    check_chunking,
    check_gla_shapes,
    group_queries,
    pad_time,
    resolve_scale,
    ungroup_queries,
)

# Sub-chunk size c (tokens of an exact [c, c, K] block); must divide the chunk size. Measured with
# `python -m bench.ops --tune` (see bench/ops.py).
SUB_CHUNK = 16

# Largest float32 element count of the biggest per-block temporary (the [c, c, K] blocks of all chunks of a block)
# per backend. Bounds the memory of the output computation and its recomputation in the backward pass.
BLOCK_ELEMS = {"cpu": 1 << 24, "gpu": 1 << 28, "tpu": 1 << 28}


def _einsum(spec: str, *xs: jax.Array) -> jax.Array:
    return jnp.einsum(spec, *xs, precision=PRECISION)


# Gates are split as g = g_hi + g_lo with g_hi on a grid of 2^-12: cumsums of g_hi are exact in float32 while
# |cumsum| < 2^12 within a chunk (gates averaging above -64 per token), so differences of them are exact, and
# |g_lo| <= 2^-13 keeps the rounding error of cumsum(g_lo) negligible.
_GRID = 4096.0


def cumsum_hi_lo(g: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Inclusive cumsum of `g` along `axis` as hi + lo: hi exact on a grid of 2^-12 (no gradient), lo small."""
    g_hi = jax.lax.stop_gradient(jnp.round(g * _GRID) / _GRID)
    return jnp.cumsum(g_hi, axis=axis), jnp.cumsum(g - g_hi, axis=axis)


def _exp_diff(x: tuple[jax.Array, jax.Array], y: tuple[jax.Array, jax.Array]) -> jax.Array:
    """exp(x - y) for hi/lo pairs (broadcasting); the caller guarantees x <= y."""
    return jnp.exp(jnp.minimum((x[0] - y[0]) + (x[1] - y[1]), 0.0))


def _chunk_outputs(
    q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, s: jax.Array, *, scale: float, sub_chunk: int
) -> jax.Array:
    """Outputs of a batch of chunks given the states entering them.

    Args:
        q: [n, Z, G, C, K] queries (Z = B * Hk).
        k: [n, Z, C, K] keys.
        v: [n, Z, C, V] values.
        g: [n, Z, C, K] log gates.
        s: [n, Z, K, V] state entering each chunk.

    Returns:
        [n, Z, G, C, V] float32 outputs.
    """
    n, Z, G, C, K = q.shape
    V = v.shape[-1]
    c = sub_chunk
    m = C // c
    hi, lo = cumsum_hi_lo(g, axis=2)  # b, [n, Z, C, K]
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


def _block_chunks(n_chunks: int, Z: int, G: int, C: int, c: int, K: int, block_elems: int | None) -> int:
    """How many chunks one block of the output computation holds."""
    if block_elems is None:
        block_elems = BLOCK_ELEMS.get(backend(), BLOCK_ELEMS["gpu"])
    per_chunk = Z * max(G, 2) * C * c * K
    return max(1, min(n_chunks, block_elems // per_chunk))


def chunk_gla_grouped(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    s0: jax.Array,
    *,
    scale: float,
    chunk_size: int = 64,
    sub_chunk: int = SUB_CHUNK,
    block_elems: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Chunked GLA on grouped queries, no shape checks (callers validate).

    Args:
        q: [B, T, Hk, G, K] queries, any float dtype.
        k: [B, T, Hk, K] keys.
        v: [B, T, Hk, V] values.
        g: [B, T, Hk, K] log forget gates.
        s0: [B, Hk, K, V] float32 initial state.
        scale: output scale.
        chunk_size: C; T is zero-padded to a multiple of it (padded steps keep the state: g = k = v = 0).
        sub_chunk: c, must divide C (a smaller C is used for short sequences).
        block_elems: memory bound of a block of chunk outputs, see `BLOCK_ELEMS`.

    Returns:
        o [B, T, Hk, G, V] float32 and the final state [B, Hk, K, V] float32.
    """
    B, T, Hk, G, K = q.shape
    V = v.shape[-1]
    c = check_chunking(chunk_size, sub_chunk)
    C = min(chunk_size, c * math.ceil(T / c))  # short sequences: one shorter chunk
    N = math.ceil(T / C)
    Tp = N * C
    Z = B * Hk
    f32 = jnp.float32

    def chunked(x: jax.Array) -> jax.Array:  # [B, Tp, Hk, D] -> [N, Z, C, D]
        D = x.shape[-1]
        x = pad_time(x.astype(f32), Tp).reshape(B, N, C, Hk, D)
        return x.transpose(1, 0, 3, 2, 4).reshape(N, Z, C, D)

    kc, vc, gc = chunked(k), chunked(v), chunked(g)
    qc = pad_time(q.astype(f32), Tp).reshape(B, N, C, Hk, G, K)
    qc = qc.transpose(1, 0, 3, 4, 2, 5).reshape(N, Z, G, C, K)

    # Decay from each token to the chunk end (exponent b_C - b_j <= 0) and across each chunk.
    hi, lo = cumsum_hi_lo(gc, axis=2)
    last = (hi[:, :, -1:], lo[:, :, -1:])
    incr = _einsum("nzck,nzcv->nzkv", kc * _exp_diff(last, (hi, lo)), vc)
    decay = jnp.exp(last[0] + last[1])[:, :, 0]  # [N, Z, K]

    def carry_state(s, xs):
        d, u = xs
        return d[..., None] * s + u, s

    s_final, s_enter = jax.lax.scan(carry_state, s0.astype(f32).reshape(Z, K, V), (decay, incr))

    nb = _block_chunks(N, Z, G, C, c, K, block_elems)

    def outputs(xs):
        return _chunk_outputs(*xs, scale=scale, sub_chunk=c)

    xs = (qc, kc, vc, gc, s_enter)
    if nb >= N:
        o = jax.checkpoint(outputs)(xs)
    else:
        # Blocks of nb chunks (the last one zero-padded: zero inputs give zero outputs), one block per map step.
        nblk = math.ceil(N / nb)
        xs = tuple(jnp.pad(x, [(0, nblk * nb - N)] + [(0, 0)] * (x.ndim - 1)) for x in xs)
        xs = tuple(x.reshape(nblk, nb, *x.shape[1:]) for x in xs)
        o = jax.lax.map(jax.checkpoint(outputs, prevent_cse=False), xs)
        o = o.reshape(nblk * nb, *o.shape[2:])[:N]
    o = o.reshape(N, B, Hk, G, C, V).transpose(1, 0, 4, 2, 3, 5).reshape(B, Tp, Hk, G, V)[:, :T]
    return o, s_final.reshape(B, Hk, K, V)


def chunk_gla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    chunk_size: int = 64,
    sub_chunk: int = SUB_CHUNK,
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
        sub_chunk: c, tokens per exact diagonal block; must divide C.
        block_elems: memory bound of the blocked output computation (default per backend).

    Returns:
        o [B, T, H, V] in q's dtype and the final state [B, Hk, K, V] float32.
    """
    B, T, H, Hk, K, V = check_gla_shapes(q, k, v, (g,), (initial_state,))
    scale = resolve_scale(scale, K)
    s0 = jnp.zeros((B, Hk, K, V), jnp.float32) if initial_state is None else initial_state
    o, s = chunk_gla_grouped(
        group_queries(q, Hk), k, v, g, s0, scale=scale, chunk_size=chunk_size, sub_chunk=sub_chunk,
        block_elems=block_elems,
    )
    return ungroup_queries(o).astype(q.dtype), s
