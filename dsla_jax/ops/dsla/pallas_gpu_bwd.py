"""Split backward of the DSLA GPU kernels (Triton lowering; `GpuConfig.bwd = "split"`, the default): FLA's structure.

Two sequential passes store one [K, V] float32 state per chunk and state, then one kernel does all the rest for every
chunk in parallel, both states in one program, and writes the final gradients (no per-state float32 pieces, no XLA
gradient assembly):

* `chunk_states_gpu(reverse=False)`: H_c, the state entering chunk c (from the forward's segment-entering states);
* `chunk_states_gpu(reverse=True)`: D_c, the adjoint of the state leaving chunk c (from the segment-end adjoints
  that `pallas_gpu.seg_states_gpu(reverse=True)` and an XLA chain give), and the initial-state gradient;
* `bwd_chunk_gpu`: per chunk c, state s (weight w_s, scale sc, ws = sc w_s, b the chunk-local inclusive gate cumsum,
  bL its last row, dA_ij = do_i . v_j):

      dq_s,i  = sc [ exp(b_i) * (do_i H_c^T) + sum_{j <= i} dA_ij k_j * exp(b_i - b_j) ]
      dk_s,j  = exp(bL - b_j) * (v_j D_c^T) + ws sum_{i >= j} dA_ij q_i * exp(b_i - b_j)
      dv_s,j  = (k_j * exp(bL - b_j)) D_c + ws sum_{i >= j} A_ij do_i
      dg_s,t  = sum_{i >= t in the chunk} (w_s q_i * dq_s,i - k_i * dk_s,i) + sum_V H_{c+1} * D_c
      dw_s    = sum_t q_t . dq_s,t

  dq = sum_s w_s dq_s, dk = sum_s dk_s, dv = sum_s dv_s. The i = j terms of dq and dk (sc (do_i . v_i) k_i and
  ws (do_i . v_i) q_i) carry no decay and cancel exactly in w_s q * dq_s - k * dk_s: they are left out of that sum
  and added to dq, dk directly (see `pallas._finish_grads`, the same gate gradient for the older kernels). The
  boundary term sum_V H_{c+1} * D_c is the exact gate gradient at the next chunk's first token, formed in the program
  from H_c. Intra-chunk exponents as the forward (`pallas_gpu._fwd_terms`): the fast tensor-core path
  when the chunk's decay range is at most `thresh`, else an elementwise loop with every exponent <= 0.

Bytes at B1 T8192 H32 D128 (bf16 inputs, 64-token chunks): each state pass reads 0.27 GB and writes 0.54 GB; the
chunk kernel reads 0.40 GB of inputs and 1.07 GB of states and writes 0.34 GB of gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from dsla_jax.ops.dsla.pallas_gpu import (
    GpuConfig,
    Numerics,
    _bwd_numerics,
    _causal,
    _col,
    _compiler_params,
    _decay_from,
    _decays,
    _exact_trips,
    _fast_factors,
    _gate_sums,
    _mm,
    _onehot,
    _put,
    _row,
    _strict,
    seg_chunk,
)

f32 = jnp.float32


# ----------------------------------------------------------------------------------------------------------------
# Per-chunk states (forward H_c and reverse adjoints D_c)
# ----------------------------------------------------------------------------------------------------------------


def _states_kernel(w_ref, x_ref, y_ref, g1_ref, g2_ref, s0_ref, st_ref, send_ref, *, H, BT, BV, NC, reverse, scale, nm):
    iv, bh, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)  # value tiles adjacent: L2 reuse
    b, h = lax.div(bh, H), lax.rem(bh, H)  # non-negative: no floor-division selects
    vs = pl.ds(iv * BV, BV)
    ws1, ws2 = (w_ref[0] * scale, w_ref[1] * scale) if reverse else (1.0, 1.0)

    def body(n, carry):
        s1, s2 = carry
        c = p * NC + (NC - 1 - n if reverse else n)
        ts = pl.ds(c * BT, BT)
        st_ref[0, bh, c, :, vs] = s1  # entering chunk c (forward) / leaving it (reverse)
        st_ref[1, bh, c, :, vs] = s2
        x = x_ref[b, ts, h, :].astype(f32)
        y = y_ref[b, ts, h, vs].astype(f32)
        s1, _ = seg_chunk(x, y * ws1, g1_ref[b, ts, h, :].astype(f32), s1, 0.0, reverse=reverse, nm=nm)
        s2, _ = seg_chunk(x, y * ws2, g2_ref[b, ts, h, :].astype(f32), s2, 0.0, reverse=reverse, nm=nm)
        return s1, s2

    s1, s2 = lax.fori_loop(0, NC, body, (s0_ref[bh, p, 0, :, vs], s0_ref[bh, p, 1, :, vs]))
    send_ref[bh, p, 0, :, vs] = s1  # forward: leaving the segment; reverse: entering it
    send_ref[bh, p, 1, :, vs] = s2


def chunk_states_gpu(
    w, x, y, g1, g2, s0, *, scale: float, cfg: GpuConfig, P: int, reverse: bool, interpret=False
) -> tuple[jax.Array, jax.Array]:
    """The state of every chunk for both states, each segment walked from its given start in parallel.

    Forward (x = k, y = v, s0 = states entering each segment): stores H_c, the state entering chunk c, and returns
    each segment's final states. Reverse (x = q, y = do, s0 = adjoints leaving each segment): stores D_c, the adjoint
    of the state leaving chunk c (the recurrence D_{c-1} = exp(bL_c) D_c + ws (q_c * exp(b_c))^T do_c), and returns
    the adjoints entering each segment (segment 0's is the initial-state gradient).

    Args:
        w: [2] float32 mix; x, g1, g2: [B, T, H, K]; y: [B, T, H, V]; s0: [B * H, P, 2, K, V] float32.

    Returns:
        per-chunk states [2, B * H, N, K, V] and per-segment end states [B * H, P, 2, K, V], float32
        (N = T / bwd_chunk).
    """
    B, T, H, K = x.shape
    V = y.shape[-1]
    BT, BV = cfg.bwd_chunk, min(cfg.block_v, V)
    NC = T // (P * BT)
    kernel = functools.partial(
        _states_kernel, H=H, BT=BT, BV=BV, NC=NC, reverse=reverse, scale=scale, nm=_bwd_numerics(cfg)
    )
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((2, B * H, T // BT, K, V), f32),
            jax.ShapeDtypeStruct((B * H, P, 2, K, V), f32),
        ),
        grid=(V // BV, B * H, P),
        compiler_params=_compiler_params(cfg.rec_num_warps, cfg.rec_num_stages, interpret),
        interpret=interpret,
        name="dsla_bwd_states_rev" if reverse else "dsla_bwd_states",
    )(w, x, y, g1, g2, s0)


# ----------------------------------------------------------------------------------------------------------------
# All gradients of one chunk, both states (every chunk in parallel)
# ----------------------------------------------------------------------------------------------------------------


def _intra_grads(q, k, b, bL, R, da, nm: Numerics):
    """Intra-chunk pieces for one state: (A masked to j <= i, sum_{j<i} dA_ij k_j e^(b_i-b_j),
    sum_{i>j} dA_ij q_i e^(b_i-b_j), exp(b), exp(bL - b)); da = do v^T masked to j < i."""
    BT = q.shape[0]
    ef, ei, em = _fast_factors(b, bL, 0.5 * nm.thresh)
    qf, kf = q * ef, k * ei
    a = _mm(qf, kf, nm.intra_dot, tb=True)  # fast path: exact for R <= thresh
    trips = _exact_trips(R, nm.thresh, 1)
    dqi = ef * _mm(da, kf, nm.intra_dot) * (1 - trips).astype(f32)  # the exact path accumulates from zero
    dki = ei * _mm(da, qf, nm.intra_dot, ta=True)
    eq, ek = _decays(b, bL, ef, ei, em, trips)

    def col(j, carry):  # exact path: column j of A, dq's column-j terms, dk's row j; every exponent <= 0
        a, dqi, dki = carry
        e = _decay_from(b, j)  # [BT(i), K]
        kj = _row(k, j)[None, :]
        daj = _col(da, j)[:, None]
        c = jnp.sum(q * kj * e, axis=1)
        r = jnp.sum(daj * q * e, axis=0)
        return (
            _put(a, _onehot((BT, BT), 1, j), c[:, None]),
            dqi + daj * kj * e,
            _put(dki, _onehot(q.shape, 0, j), r[None, :]),
        )

    a, dqi, dki = lax.fori_loop(0, trips * BT, col, (a, dqi, dki))
    return a * _causal(BT), dqi, dki, eq, ek


def _chunk_kernel(
    w_ref, q_ref, k_ref, v_ref, do_ref, g1_ref, g2_ref, hs_ref, ds_ref, dq_ref, dk_ref, dv_ref, dg1_ref, dg2_ref,
    dw_ref, *, H, BT, scale, nm, cum_dot,
):  # fmt: skip
    bh, c = pl.program_id(0), pl.program_id(1)
    b, h = lax.div(bh, H), lax.rem(bh, H)  # non-negative: no floor-division selects
    ts = pl.ds(c * BT, BT)
    q = q_ref[b, ts, h, :].astype(f32)  # [BT, K]
    k = k_ref[b, ts, h, :].astype(f32)
    v = v_ref[b, ts, h, :].astype(f32)  # [BT, V]
    do = do_ref[b, ts, h, :].astype(f32)
    da = _mm(do, v, nm.intra_dot, tb=True) * _strict(BT)  # [BT(i), BT(j)] = do_i . v_j, j < i
    dvd = jnp.sum(do * v, axis=1)[:, None]  # do_i . v_i: the i = j terms
    upper = 1.0 - _strict(BT)  # [t, i]: 1 where i >= t
    dq = dk = dv = None
    for s, (g_ref, dg_ref) in enumerate(((g1_ref, dg1_ref), (g2_ref, dg2_ref))):
        w = w_ref[s]
        ws = w * scale
        bg, bL, R = _gate_sums(g_ref[b, ts, h, :].astype(f32), nm.tril)
        a, dqi, dki, eq, ek = _intra_grads(q, k, bg, bL, R, da, nm)
        hs = hs_ref[s, bh, c]  # [K, V] entering the chunk
        dS = ds_ref[s, bh, c]  # [K, V] adjoint of the state leaving it
        kd = k * ek
        vds = _mm(v, dS, nm.state_dot, tb=True)  # [BT, K] = v_j D_c^T
        dq_s = scale * (_mm(do, hs, nm.state_dot, tb=True) * eq + dqi)  # unweighted, without i = j
        dk_s = vds * ek + ws * dki  # without i = j
        dv_s = _mm(kd, dS, nm.state_dot) + ws * _mm(a, do, nm.intra_dot, ta=True)
        # sum_V H_{c+1} * D_c with H_{c+1} = exp(bL) H_c + kd^T v, the second term as sum_j kd_j * (v_j D_c^T):
        # no [K, V] matmul, no H_{c+1} tile.
        nxt = jnp.exp(bL) * jnp.sum(hs * dS, axis=1) + jnp.sum(kd * vds, axis=0)  # [K]
        r = w * q * dq_s - k * dk_s
        rev = _mm(upper, r, cum_dot)  # sum_{i >= t} r_i: a 0/1 matmul, accurate at 3-pass tf32 or float32
        dg_ref[b, ts, h, :] = (rev + nxt[None, :]).astype(dg_ref.dtype)
        dq_full = dq_s + scale * dvd * k
        dw_ref[s, bh, c, :] = jnp.sum(q * dq_full, axis=0)
        dq = w * dq_full if dq is None else dq + w * dq_full
        dk = dk_s if dk is None else dk + dk_s
        dv = dv_s if dv is None else dv + dv_s
    dk = dk + (w_ref[0] + w_ref[1]) * scale * dvd * q
    dq_ref[b, ts, h, :] = dq.astype(dq_ref.dtype)
    dk_ref[b, ts, h, :] = dk.astype(dk_ref.dtype)
    dv_ref[b, ts, h, :] = dv.astype(dv_ref.dtype)


def bwd_chunk_gpu(w, q, k, v, do, g1, g2, hs, ds, *, scale: float, cfg: GpuConfig, interpret=False):
    """Every input gradient, every chunk in parallel, from the per-chunk states of `chunk_states_gpu`.

    Args:
        w: [2] float32 mix; q, k, g1, g2: [B, T, H, K]; v, do: [B, T, H, V];
        hs: [2, B * H, N, K, V] states entering each chunk; ds: [2, B * H, N, K, V] adjoints of the states leaving
        each chunk (N = T / bwd_chunk), float32.

    Returns:
        dq, dk [B, T, H, K] and dv [B, T, H, V] in q's dtype, dg1, dg2 [B, T, H, K] in g1's dtype, and per-chunk
        pieces of the mix gradient [2, B * H, N, K] float32 (dw_s is their sum).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT = cfg.bwd_chunk
    N = T // BT
    nm = _bwd_numerics(cfg)
    cum_dot = "ieee" if nm.intra_dot == "ieee" else "tf32x3"
    kernel = functools.partial(_chunk_kernel, H=H, BT=BT, scale=scale, nm=nm, cum_dot=cum_dot)
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((B, T, H, K), q.dtype),
            jax.ShapeDtypeStruct((B, T, H, K), q.dtype),
            jax.ShapeDtypeStruct((B, T, H, V), q.dtype),
            jax.ShapeDtypeStruct((B, T, H, K), g1.dtype),
            jax.ShapeDtypeStruct((B, T, H, K), g1.dtype),
            jax.ShapeDtypeStruct((2, B * H, N, K), f32),
        ),
        grid=(B * H, N),
        compiler_params=_compiler_params(cfg.bwd_num_warps, cfg.bwd_num_stages, interpret),
        interpret=interpret,
        name="dsla_bwd_chunk",
    )(w, q, k, v, do, g1, g2, hs, ds)
