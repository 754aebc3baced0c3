"""Split backward of the DSLA GPU kernels (Triton lowering; `GpuConfig.bwd = "split"`, the default): FLA's structure.

Two sequential passes store one [K, V] float32 state per chunk and state, then two kernels compute every gradient of
every chunk in parallel, both states in one program, and write the final gradients (no per-state float32 pieces):

* `chunk_states_gpu(reverse=False)`: H_c, the state entering chunk c, each segment from the state entering it (the
  forward's residual).
* `chunk_states_gpu(reverse=True)`: the adjoint recurrence D_{c-1} = exp(bL_c) D_c + ws (q_c * exp(b_c))^T do_c
  run from zero at every segment's end, all segments in parallel. It stores the segment-local adjoint of the state
  leaving each chunk, Dloc_c, and the decay from that chunk's end to its segment's end, e_c (a product of exp(bL)).
  The caller chains the segments' totals in XLA to the adjoints leaving each segment, dS_end[p]; then the true
  adjoint is D_c = Dloc_c + e_c * dS_end[p(c)], formed where it is read. (No reverse summary pass over the sequence
  beforehand: that pass cost as much as the states pass itself.)
* `bwd_grads_gpu`'s dq / dk kernel, per chunk c and state s (weight w_s, scale sc, ws = sc w_s, b the chunk-local
  inclusive gate cumsum, bL its last row, dA_ij = do_i . v_j):

      dq_s,i  = sc [ exp(b_i) * (do_i H_c^T) + sum_{j <= i} dA_ij k_j * exp(b_i - b_j) ]
      dk_s,j  = exp(bL - b_j) * (v_j D_c^T) + ws sum_{i >= j} dA_ij q_i * exp(b_i - b_j)
      dg_s,t  = sum_{i >= t in the chunk} (w_s q_i * dq_s,i - k_i * dk_s,i) + sum_V H_{c+1} * D_c
      dw_s    = sum_t q_t . dq_s,t

  and writes dq = sum_s w_s dq_s, dk = sum_s dk_s, dg_s, one key tile per program; the states are streamed in
  [block_k, BV] tiles (a loop over value tiles), never held whole. `GpuConfig.grads_order` sets how the work is
  split. The default, "split" (FLA's structure): `_dqk_intra_kernel` stores the intra-chunk terms (the sums over
  j <= i above) per state in float32 on the fast path only, flagging tiles whose decay range exceeds the bound; a
  fix-up launch of the same kernel redoes the flagged tiles on the exact path in place; then `_dqk_kernel` adds the
  state terms and forms dg. "intra-first" and "states-first" do it all in one kernel (no float32 intermediates,
  but more live tiles and register spills: slower on the card). The i = j terms of dq and dk (sc (do_i . v_i) k_i
  and ws (do_i . v_i) q_i) carry no decay and cancel exactly in w_s q * dq_s - k * dk_s: they are left out of
  that sum and added to dq, dk directly (the same gate gradient as `pallas._finish_grads` for the older kernels).
  sum_V H_{c+1} * D_c, the exact gate gradient at the next chunk's first token, is exp(bL) sum_V H_c * D_c
  + sum_j kd_j * (v_j D_c^T).
* `bwd_grads_gpu`'s dv kernel, per chunk and value tile: dv_j = sum_s (k_j * exp(bL - b_j)) D_c
  + sum_{i >= j} A_ij do_i, the state term summed over key tiles, A = scale sum_s w_s A_s the mixed scores the
  forward's intra-chunk kernel stored (a [T, chunk] float32 residual per head: the backward recomputes no scores
  for dv, and the dv kernel has no intra-chunk paths).

Register pressure sets the tiling (v2 of this backward held whole [K, V] states and [BT, K] tiles per program: 255
registers and 16 GB of spill traffic per call at B1 T8192 on an H200). Everything but the scores A is separate per key
channel, so the dq / dk kernel takes [BT, block_k] tiles of q, k, g and [block_k, BV] tiles of the states.

Intra-chunk exponents as the forward (`pallas_gpu._fwd_terms`): the fast tensor-core path when the chunk's decay
range is at most `thresh`, else an elementwise loop with every exponent <= 0.

Bytes at B1 T8192 H32 D128 (bf16 inputs, 64-token chunks): each state pass reads 0.27 GB and writes 0.54 GB; the
dq / dk kernel reads 0.40 GB of inputs and 1.07 GB of states, the dv kernel 0.27 GB and 0.54 GB.
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
# Per-chunk states (forward H_c; reverse segment-local adjoints Dloc_c with their decays to the segment end)
# ----------------------------------------------------------------------------------------------------------------


def _states_kernel(x_ref, y_ref, g1_ref, g2_ref, s0_ref, st_ref, send_ref, *, H, BT, BK, BV, NC, nm):
    iv, ik, bh, p = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)  # tiles adjacent: L2
    b, h = lax.div(bh, H), lax.rem(bh, H)  # non-negative: no floor-division selects
    ks, vs = pl.ds(ik * BK, BK), pl.ds(iv * BV, BV)

    def body(n, carry):
        s1, s2 = carry
        c = p * NC + n
        ts = pl.ds(c * BT, BT)
        st_ref[0, bh, c, ks, vs] = s1  # the state entering chunk c
        st_ref[1, bh, c, ks, vs] = s2
        x = x_ref[b, ts, h, ks].astype(f32)
        y = y_ref[b, ts, h, vs].astype(f32)
        s1, _ = seg_chunk(x, y, g1_ref[b, ts, h, ks].astype(f32), s1, 0.0, reverse=False, nm=nm)
        s2, _ = seg_chunk(x, y, g2_ref[b, ts, h, ks].astype(f32), s2, 0.0, reverse=False, nm=nm)
        return s1, s2

    s1, s2 = lax.fori_loop(0, NC, body, (s0_ref[bh, p, 0, ks, vs], s0_ref[bh, p, 1, ks, vs]))
    send_ref[bh, p, 0, ks, vs] = s1
    send_ref[bh, p, 1, ks, vs] = s2


def _adjoint_kernel(
    w_ref, x_ref, y_ref, g1_ref, g2_ref, st_ref, e_ref, send_ref, dend_ref, *, H, BT, BK, BV, NC, scale, nm
):
    iv, ik, bh, p = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    b, h = lax.div(bh, H), lax.rem(bh, H)
    ks, vs = pl.ds(ik * BK, BK), pl.ds(iv * BV, BV)
    ws1, ws2 = w_ref[0] * scale, w_ref[1] * scale

    def body(n, carry):
        s1, s2, e1, e2 = carry
        c = p * NC + NC - 1 - n
        ts = pl.ds(c * BT, BT)
        st_ref[0, bh, c, ks, vs] = s1  # the segment-local adjoint of the state leaving chunk c
        st_ref[1, bh, c, ks, vs] = s2
        e_ref[0, bh, c, iv, ks] = e1  # decay from chunk c's end to the segment's end (the same for every value tile)
        e_ref[1, bh, c, iv, ks] = e2
        x = x_ref[b, ts, h, ks].astype(f32)
        y = y_ref[b, ts, h, vs].astype(f32)
        s1, d1 = seg_chunk(x, y * ws1, g1_ref[b, ts, h, ks].astype(f32), s1, 0.0, reverse=True, nm=nm)
        s2, d2 = seg_chunk(x, y * ws2, g2_ref[b, ts, h, ks].astype(f32), s2, 0.0, reverse=True, nm=nm)
        return s1, s2, e1 * jnp.exp(d1), e2 * jnp.exp(d2)

    z, one = jnp.zeros((BK, BV), f32), jnp.ones((BK,), f32)
    s1, s2, e1, e2 = lax.fori_loop(0, NC, body, (z, z, one, one))
    send_ref[bh, p, 0, ks, vs] = s1  # the segment's own adjoint entering it
    send_ref[bh, p, 1, ks, vs] = s2
    dend_ref[bh, p, iv, 0, ks] = e1  # the segment's total decay
    dend_ref[bh, p, iv, 1, ks] = e2


def chunk_states_gpu(w, x, y, g1, g2, s0, *, scale: float, cfg: GpuConfig, P: int, reverse: bool, interpret=False):
    """The state (forward) or segment-local adjoint (reverse) at every chunk, for both states, segments in parallel.

    Forward (x = k, y = v, s0 = the states entering each segment [B * H, P, 2, K, V]): returns the state entering
    every chunk [2, B * H, N, K, V] and each segment's final states [B * H, P, 2, K, V].
    Reverse (x = q, y = do, s0 ignored: every segment starts from zero at its end): returns the segment-local adjoint
    of the state leaving every chunk [2, B * H, N, K, V], the decay from every chunk's end to its segment's end
    [2, B * H, N, nv, K] (value tiles nv, all equal), each segment's local adjoint entering it [B * H, P, 2, K, V]
    and its total decay [B * H, P, nv, 2, K].

    The recurrence is separate per key channel, so programs take [states_block_k, block_v] tiles of the states.

    Args:
        w: [2] float32 mix (reverse only: the adjoint carries w_s * scale); x, g1, g2: [B, T, H, K]; y: [B, T, H, V];
        T = P * (chunks per segment) * bwd_chunk.
    """
    B, T, H, K = x.shape
    V = y.shape[-1]
    BT, BK, BV = cfg.bwd_chunk, min(cfg.states_block_k or K, K), min(cfg.block_v, V)
    NC, N, nv = T // (P * BT), T // BT, V // BV
    nm = _bwd_numerics(cfg)
    st = jax.ShapeDtypeStruct((2, B * H, N, K, V), f32)
    ends = jax.ShapeDtypeStruct((B * H, P, 2, K, V), f32)
    if reverse:
        kernel = functools.partial(_adjoint_kernel, H=H, BT=BT, BK=BK, BV=BV, NC=NC, scale=scale, nm=nm)
        out_shape = (
            st,
            jax.ShapeDtypeStruct((2, B * H, N, nv, K), f32),
            ends,
            jax.ShapeDtypeStruct((B * H, P, nv, 2, K), f32),
        )
        args = (w, x, y, g1, g2)
    else:
        kernel = functools.partial(_states_kernel, H=H, BT=BT, BK=BK, BV=BV, NC=NC, nm=nm)
        out_shape = (st, ends)
        args = (x, y, g1, g2, s0)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(nv, K // BK, B * H, P),
        compiler_params=_compiler_params(cfg.states_num_warps or cfg.rec_num_warps, cfg.rec_num_stages, interpret),
        interpret=interpret,
        name="dsla_bwd_adjoints" if reverse else "dsla_bwd_states",
    )(*args)


def chain_adjoints(ds_T, send, dend):
    """Adjoints of the states leaving each segment [B * H, P, 2, K, V] and the initial-state gradient
    [B * H, 2, K, V], from the adjoint of the final states ds_T [B * H, 2, K, V] and the reverse pass's
    per-segment local adjoints `send` and decays `dend` [B * H, P, 2, K] (XLA; P is small)."""
    P = send.shape[1]
    ds_end = [ds_T]
    for p in range(P - 1, 0, -1):  # segment p - 1 ends where segment p starts
        ds_end.append(dend[:, p][..., None] * ds_end[-1] + send[:, p])
    dh0 = dend[:, 0][..., None] * ds_end[-1] + send[:, 0]
    return jnp.stack(ds_end[::-1], axis=1), dh0


# ----------------------------------------------------------------------------------------------------------------
# Gradients of every chunk in parallel, both states per program
# ----------------------------------------------------------------------------------------------------------------


def _intra_dqk(q, k, b, bL, R, da, nm: Numerics):
    """Intra-chunk pieces of one state: (sum_{j<i} dA_ij k_j e^(b_i-b_j), sum_{i>j} dA_ij q_i e^(b_i-b_j), exp(b),
    exp(bL - b)), da = do v^T masked to j < i; the fast path or, past the decay range bound, the exact loop."""
    ef, ei, em = _fast_factors(b, bL, 0.5 * nm.thresh)
    trips = _exact_trips(R, nm.thresh, 1)
    dqi = ef * _mm(da, k * ei, nm.intra_dot) * (1 - trips).astype(f32)  # the exact path accumulates from zero
    dki = ei * _mm(da, q * ef, nm.intra_dot, ta=True)
    eq, ek = _decays(b, bL, ef, ei, em, trips)

    def col(j, carry):  # exact path: dq's column-j terms and dk's row j, every exponent <= 0
        dqi, dki = carry
        e = _decay_from(b, j)  # [BT(i), K]
        daj = _col(da, j)[:, None]
        r = jnp.sum(daj * q * e, axis=0)
        return dqi + daj * _row(k, j)[None, :] * e, _put(dki, _onehot(q.shape, 0, j), r[None, :])

    dqi, dki = lax.fori_loop(0, trips * q.shape[0], col, (dqi, dki))
    return dqi, dki, eq, ek


def _exact_dot(x_ref, y_ref, mode: str) -> str:
    """The `_mm` mode for a product of two loaded inputs: "bf16" when both are bfloat16 (their products are exact
    in the float32 accumulator, so more passes buy nothing), else `mode`."""
    return "bf16" if x_ref.dtype == y_ref.dtype == jnp.bfloat16 else mode


def _rev_cumsum(r, upper, cum_dot):
    """sum_{i >= t} r_i over the rows of r [BT, BK]: a float32 scan (Triton; `cum_dot` "scan"), or a 0/1 matmul
    (exact at 3-pass tf32 or float32)."""
    if cum_dot == "scan":
        return jnp.sum(r, axis=0)[None, :] - jnp.cumsum(r, axis=0) + r
    return _mm(upper, r, cum_dot)


def _dqk_intra_kernel(q_ref, k_ref, v_ref, do_ref, g1_ref, g2_ref, *refs, H, BT, BK, BV, nm, exact):
    """`grads_order="split"`: the intra-chunk terms of dq and dk of one state, stored in float32. The grid's first
    (fastest) axis runs over (state, key tile): one state per program keeps its live tiles few, and a chunk's
    programs run together, sharing its do, v, q, k in L2.

    exact=False: the fast tensor-core path only (every chunk; no data-dependent loop, so nothing of the exact path
    holds registers); it also writes a flag per program: 1 where the key tile's decay range exceeds the bound.
    exact=True: the fix-up pass, run after it with the outputs aliased: flagged programs recompute their tile on
    the exact path and overwrite it; the others read their flag and stop (without the aliased inputs: fresh
    outputs, written on the flagged tiles only).
    """
    sk, bh, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)  # a chunk's tiles adjacent: L2 reuse
    nk = q_ref.shape[-1] // BK
    s, ik = lax.div(sk, nk), lax.rem(sk, nk)
    b, h = lax.div(bh, H), lax.rem(bh, H)
    ts, ks = pl.ds(c * BT, BT), pl.ds(ik * BK, BK)
    if exact:
        flag_ref, *_, dqi_ref, dki_ref = refs  # (flags, the aliased inputs if any, the outputs)
    else:
        dqi_ref, dki_ref, flag_ref = refs

    def dav(iv, da):
        vs = pl.ds(iv * BV, BV)
        return da + _mm(do_ref[b, ts, h, vs], v_ref[b, ts, h, vs], _exact_dot(do_ref, v_ref, nm.intra_dot), tb=True)

    def chunk(_, carry):
        s1 = s.astype(f32)  # this program's state as a 0 / 1 blend of the two gate tiles (exact: no selects)
        g = g1_ref[b, ts, h, ks].astype(f32) * (1.0 - s1) + g2_ref[b, ts, h, ks].astype(f32) * s1
        da = lax.fori_loop(0, v_ref.shape[-1] // BV, dav, jnp.zeros((BT, BT), f32)) * _strict(BT)  # j < i
        q = q_ref[b, ts, h, ks].astype(f32)
        k = k_ref[b, ts, h, ks].astype(f32)
        bg, bL, R = _gate_sums(g, nm.tril)
        if exact:
            dqi, dki, _, _ = _intra_dqk(q, k, bg, bL, R, da, nm)
        else:  # clamped factors: finite everywhere, exact where the decay range is within the bound
            ef, ei, _ = _fast_factors(bg, bL, 0.5 * nm.thresh)
            dqi = ef * _mm(da, k * ei, nm.intra_dot)
            dki = ei * _mm(da, q * ef, nm.intra_dot, ta=True)
            flag_ref[sk, bh, c] = _exact_trips(R, nm.thresh, 1).astype(f32)
        dqi_ref[s, bh, ts, ks] = dqi
        dki_ref[s, bh, ts, ks] = dki
        return carry

    if exact:  # a loop of 0 or 1 trips: Triton has no tensor-valued conditionals
        lax.fori_loop(0, flag_ref[sk, bh, c].astype(jnp.int32), chunk, 0)
    else:
        chunk(0, 0)


def _dqk_kernel(*refs, H, BT, BK, BV, NC, scale, nm, cum_dot, order):
    if order == "split":  # the intra-chunk terms come from `_dqk_intra_kernel`
        (w_ref, q_ref, k_ref, v_ref, do_ref, g1_ref, g2_ref, hs_ref, dl_ref, e_ref, dend_ref, dqi_ref, dki_ref,
         dq_ref, dk_ref, dg1_ref, dg2_ref, dw_ref) = refs  # fmt: skip
    else:
        (w_ref, q_ref, k_ref, v_ref, do_ref, g1_ref, g2_ref, hs_ref, dl_ref, e_ref, dend_ref,
         dq_ref, dk_ref, dg1_ref, dg2_ref, dw_ref) = refs  # fmt: skip
    ik, bh, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)  # a chunk's key tiles adjacent: L2 reuse
    b, h = lax.div(bh, H), lax.rem(bh, H)  # non-negative: no floor-division selects
    p = lax.div(c, NC)
    ts, ks = pl.ds(c * BT, BT), pl.ds(ik * BK, BK)
    nv = v_ref.shape[-1] // BV
    zt, zk = jnp.zeros((BT, BT), f32), jnp.zeros((BT, BK), f32)

    def value_tiles(s, e_c, with_da, with_dvd):
        """One loop over value tiles: (do H_c^T, v D_c^T, sum_V H_c * D_c) of state s if s is not None, do v^T if
        with_da and the diagonal do_i . v_i if with_dvd."""

        def body(iv, carry):
            dqh, vds, hsum, da, dvd = carry
            vs = pl.ds(iv * BV, BV)
            if with_da:  # (from the loaded dtype: bfloat16 products are exact)
                da = da + _mm(
                    do_ref[b, ts, h, vs], v_ref[b, ts, h, vs], _exact_dot(do_ref, v_ref, nm.intra_dot), tb=True
                )
            do, v = do_ref[b, ts, h, vs].astype(f32), v_ref[b, ts, h, vs].astype(f32)
            if with_dvd:
                dvd = dvd + jnp.sum(do * v, axis=1)[:, None]
            if s is not None:  # the states in [BK, BV] tiles
                hs = hs_ref[s, bh, c, ks, vs]  # entering the chunk
                dS = dl_ref[s, bh, c, ks, vs] + e_c * dend_ref[bh, p, s, ks, vs]  # adjoint of the state leaving it
                dqh = dqh + _mm(do, hs, nm.state_dot, tb=True)
                vds = vds + _mm(v, dS, nm.state_dot, tb=True)
                hsum = hsum + jnp.sum(hs * dS, axis=1)
            return dqh, vds, hsum, da, dvd

        return lax.fori_loop(0, nv, body, (zk, zk, jnp.zeros((BK,), f32), zt, jnp.zeros((BT, 1), f32)))

    if order == "intra-first":  # dA once for both states, then per state the intra terms before the state loop
        _, _, _, da, dvd = value_tiles(None, None, True, True)
        q = q_ref[b, ts, h, ks].astype(f32)  # [BT, BK]: everything below is separate per key channel
        k = k_ref[b, ts, h, ks].astype(f32)
    upper = 1.0 - _strict(BT)  # [t, i]: 1 where i >= t
    dq = dk = None
    for s, (g_ref, dg_ref) in enumerate(((g1_ref, dg1_ref), (g2_ref, dg2_ref))):
        w = w_ref[s]
        ws = w * scale
        e_c = e_ref[s, bh, c, 0, ks][:, None]  # decay from the chunk's end to the segment's end
        if order != "intra-first":  # the state loop first, so fewer tiles live across it
            dqh, vds, hsum, da, dvd = value_tiles(s, e_c, order == "states-first", True)
            q = q_ref[b, ts, h, ks].astype(f32)
            k = k_ref[b, ts, h, ks].astype(f32)
        bg, bL, R = _gate_sums(g_ref[b, ts, h, ks].astype(f32), nm.tril)
        if order == "split":
            dqi, dki = dqi_ref[s, bh, ts, ks], dki_ref[s, bh, ts, ks]
            eq, ek = jnp.exp(bg), jnp.exp(jnp.minimum(bL[None, :] - bg, 0.0))  # exponents <= 0
        else:
            dqi, dki, eq, ek = _intra_dqk(q, k, bg, bL, R, da * _strict(BT), nm)  # dA masked to j < i
        if order == "intra-first":
            dqh, vds, hsum, _, _ = value_tiles(s, e_c, False, False)
        dq_s = scale * (dqh * eq + dqi)  # unweighted, without i = j
        dk_s = vds * ek + ws * dki  # without i = j
        nxt = jnp.exp(bL) * hsum + jnp.sum(k * ek * vds, axis=0)  # sum_V H_{c+1} * D_c, [BK]
        r = w * q * dq_s - k * dk_s
        rev = _rev_cumsum(r, upper, cum_dot)  # sum_{i >= t} r_i
        dg_ref[b, ts, h, ks] = (rev + nxt[None, :]).astype(dg_ref.dtype)
        dq_full = dq_s + scale * dvd * k
        dw_ref[s, bh, c, ks] = jnp.sum(q * dq_full, axis=0)
        dq = w * dq_full if dq is None else dq + w * dq_full
        dk = dk_s if dk is None else dk + dk_s
    dk = dk + (w_ref[0] + w_ref[1]) * scale * dvd * q
    dq_ref[b, ts, h, ks] = dq.astype(dq_ref.dtype)
    dk_ref[b, ts, h, ks] = dk.astype(dk_ref.dtype)


def _dv_kernel(a_ref, k_ref, do_ref, g1_ref, g2_ref, dl_ref, e_ref, dend_ref, dv_ref, *, H, BT, BK, BV, NC, nm):
    iv, bh, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)  # a chunk's value tiles adjacent: L2 reuse
    b, h = lax.div(bh, H), lax.rem(bh, H)
    p = lax.div(c, NC)
    ts, vs = pl.ds(c * BT, BT), pl.ds(iv * BV, BV)

    def ktile(ik, dv):  # sum_s (k * exp(bL - b)) D_c over key tiles; exponents <= 0, no intra-chunk paths
        ks = pl.ds(ik * BK, BK)
        k = k_ref[b, ts, h, ks].astype(f32)
        for s, g_ref in enumerate((g1_ref, g2_ref)):
            bg, bL, _ = _gate_sums(g_ref[b, ts, h, ks].astype(f32), nm.tril)
            kd = k * jnp.exp(jnp.minimum(bL[None, :] - bg, 0.0))
            dS = dl_ref[s, bh, c, ks, vs] + e_ref[s, bh, c, 0, ks][:, None] * dend_ref[bh, p, s, ks, vs]
            dv = dv + _mm(kd, dS, nm.state_dot)
        return dv

    dv = lax.fori_loop(0, k_ref.shape[-1] // BK, ktile, jnp.zeros((BT, BV), f32))
    # The mixed scores scale * sum_s w_s A_s from the forward (`pallas_gpu.fwd_intra_gpu`), masked to j <= i.
    dv = dv + _mm(a_ref[bh, ts, :], do_ref[b, ts, h, vs].astype(f32), nm.intra_dot, ta=True)
    dv_ref[b, ts, h, vs] = dv.astype(dv_ref.dtype)


def _intra_setup(q, v, cfg: GpuConfig, interpret):
    """(grid, kernel keywords, compiler params) of the intra-chunk dq / dk kernels (`_dqk_intra_kernel`)."""
    B, T, H, K = q.shape
    BT, BV = cfg.bwd_chunk, min(cfg.grads_block_v, v.shape[-1])
    BKi = min(cfg.dqk_intra_block_k or cfg.block_k, K)
    params = _compiler_params(cfg.dqk_intra_num_warps or cfg.grads_num_warps, cfg.grads_num_stages, interpret)
    ikw = dict(H=H, BT=BT, BK=BKi, BV=BV, nm=_bwd_numerics(cfg))
    grid = (2 * (K // BKi), B * H, T // BT)  # (state, key tile) fastest: the programs of a chunk share do, v, q, k
    return grid, ikw, params


def intra_terms_gpu(q, k, v, do, g1, g2, *, cfg: GpuConfig, interpret=False) -> tuple[jax.Array, jax.Array]:
    """The intra-chunk terms of dq and dk of each state, [2, B * H, T, K] float32 each (grads_order "split";
    `_dqk_intra_kernel`): the fast path for every chunk, then the exact path in place where the decay range needs it.
    """
    B, T, H, K = q.shape
    grid, ikw, params = _intra_setup(q, v, cfg, interpret)
    intra = pl.pallas_call(
        functools.partial(_dqk_intra_kernel, exact=False, **ikw),
        out_shape=(jax.ShapeDtypeStruct((2, B * H, T, K), f32),) * 2 + (jax.ShapeDtypeStruct(grid, f32),),
        grid=grid,
        compiler_params=params,
        interpret=interpret,
        name="dsla_bwd_dqk_intra",
    )(q, k, v, do, g1, g2)
    return intra_terms_fixup_gpu(q, k, v, do, g1, g2, intra[2], *intra[:2], cfg=cfg, interpret=interpret)


def intra_flags(bl: jax.Array, cfg: GpuConfig) -> jax.Array:
    """The flags `intra_terms_fixup_gpu` reads, [2 * K / BK, B * H, N] float32 (BK its key tile), from the
    per-chunk gate sums bl [2, B * H, N, K] (`pallas_gpu.chunk_gate_sums`): 1 where the key tile's decay range
    max(-bL) exceeds the fast path's bound, as `_dqk_intra_kernel`'s fast launch writes them."""
    S, BH, N, K = bl.shape
    BKi = min(cfg.dqk_intra_block_k or cfg.block_k, K)
    r = jnp.max(-bl.reshape(S, BH, N, K // BKi, BKi), axis=-1)  # [2, B * H, N, K / BK]
    return (jnp.moveaxis(r, -1, 1).reshape(S * (K // BKi), BH, N) > cfg.thresh).astype(f32)


def intra_terms_fixup_gpu(q, k, v, do, g1, g2, flags, dqi=None, dki=None, *, cfg: GpuConfig, interpret=False):
    """The exact path of `_dqk_intra_kernel` on the flagged (state, key tile, chunk) programs only, flags as
    `intra_flags`. With dqi, dki ([2, B * H, T, K] float32 from a fast path: Triton's or `pallas_gpu_bwd_mgpu.
    dqk_intra_mgpu`): in place. Without: into fresh arrays whose other tiles are never written (garbage, not zeros),
    for a kernel that computes the fast path itself and reads these tiles only where flagged
    (`pallas_gpu_bwd_mgpu.dqk_mgpu` with flags)."""
    B, T, H, K = q.shape
    grid, ikw, params = _intra_setup(q, v, cfg, interpret)
    prior = () if dqi is None else (dqi, dki)
    return pl.pallas_call(  # the exact path where a chunk's decay range needs it
        functools.partial(_dqk_intra_kernel, exact=True, **ikw),
        out_shape=(jax.ShapeDtypeStruct((2, B * H, T, K), f32),) * 2,
        grid=grid,
        input_output_aliases={7: 0, 8: 1} if prior else {},
        compiler_params=params,
        interpret=interpret,
        name="dsla_bwd_dqk_exact",
    )(q, k, v, do, g1, g2, flags, *prior)


def bwd_grads_gpu(
    w,
    q,
    k,
    v,
    do,
    g1,
    g2,
    hs,
    dl,
    e,
    ds_end,
    a,
    *,
    scale: float,
    cfg: GpuConfig,
    P: int,
    interpret=False,
    kv_f32: bool = False,
    with_dv: bool = True,
):
    """Every input gradient, every chunk in parallel, from `chunk_states_gpu`'s per-chunk states (two kernels: dq / dk
    / dg per key tile, dv per value tile; dv is None without `with_dv`: the caller computes it).

    Args:
        w: [2] float32 mix; q, k, g1, g2: [B, T, H, K]; v, do: [B, T, H, V];
        hs: [2, B * H, N, K, V] states entering each chunk; dl: [2, B * H, N, K, V] segment-local adjoints of the
        states leaving each chunk and e [2, B * H, N, nv, K] their decays to the segment end; ds_end:
        [B * H, P, 2, K, V] adjoints of the states leaving each segment (`chain_adjoints`); a: [B * H, T, BT] the
        forward's mixed intra-chunk scores (`pallas_gpu.fwd_intra_gpu`, its chunk = bwd_chunk); all float32.

        kv_f32: dk, dv, dg1, dg2 in float32 (grouped heads: the caller sums each kv head's G gradients before one
            rounding to the input dtype).

    Returns:
        dq, dk [B, T, H, K] and dv [B, T, H, V] in q's dtype, dg1, dg2 [B, T, H, K] in g1's dtype (dk, dv, dg1, dg2
        float32 with kv_f32), and per-chunk pieces of the mix gradient [2, B * H, N, K] float32 (dw_s is their sum).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT, BK, BV = cfg.bwd_chunk, min(cfg.block_k, K), min(cfg.grads_block_v, V)
    N = T // BT
    NC = N // P
    nm = _bwd_numerics(cfg)
    if cfg.grads_order not in ("intra-first", "states-first", "split"):
        raise ValueError(
            f"GpuConfig.grads_order must be 'intra-first', 'states-first' or 'split', got {cfg.grads_order!r}"
        )
    cum_dot = cfg.grads_cumsum if cfg.grads_cumsum != "dot" else ("ieee" if nm.intra_dot == "ieee" else "tf32x3")
    params = _compiler_params(cfg.grads_num_warps, cfg.grads_num_stages, interpret)
    kw = dict(H=H, BT=BT, BK=BK, BV=BV, NC=NC, scale=scale, nm=nm)
    intra = intra_terms_gpu(q, k, v, do, g1, g2, cfg=cfg, interpret=interpret) if cfg.grads_order == "split" else ()
    dq, dk, dg1, dg2, dw = pl.pallas_call(
        functools.partial(_dqk_kernel, cum_dot=cum_dot, order=cfg.grads_order, **kw),
        out_shape=(
            jax.ShapeDtypeStruct((B, T, H, K), q.dtype),
            jax.ShapeDtypeStruct((B, T, H, K), f32 if kv_f32 else q.dtype),
            jax.ShapeDtypeStruct((B, T, H, K), f32 if kv_f32 else g1.dtype),
            jax.ShapeDtypeStruct((B, T, H, K), f32 if kv_f32 else g1.dtype),
            jax.ShapeDtypeStruct((2, B * H, N, K), f32),
        ),
        grid=(K // BK, B * H, N),
        compiler_params=params,
        interpret=interpret,
        name="dsla_bwd_dqk",
    )(w, q, k, v, do, g1, g2, hs, dl, e, ds_end, *intra)
    if not with_dv:
        return dq, dk, None, dg1, dg2, dw
    dv = dv_gpu(k, do, g1, g2, dl, e, ds_end, a, cfg=cfg, P=P, out_dtype=f32 if kv_f32 else q.dtype,
                interpret=interpret)  # fmt: skip
    return dq, dk, dv, dg1, dg2, dw


def dv_gpu(k, do, g1, g2, dl, e, ds_end, a, *, cfg: GpuConfig, P: int, out_dtype, interpret=False):
    """dv [B, T, H, V] in out_dtype of every chunk in parallel (`_dv_kernel`; arguments as `bwd_grads_gpu`: the mix
    and scale are in the stored scores a and the adjoints)."""
    B, T, H, K = k.shape
    V = do.shape[-1]
    BT, BK, BV = cfg.bwd_chunk, min(cfg.block_k, K), min(cfg.grads_block_v, V)
    NC = T // BT // P
    dv_params = _compiler_params(cfg.dv_num_warps or cfg.grads_num_warps, cfg.grads_num_stages, interpret)
    BVd = min(cfg.dv_block_v or BV, V)
    kw = dict(H=H, BT=BT, BK=min(cfg.dv_block_k or BK, K), BV=BVd, NC=NC, nm=_bwd_numerics(cfg))
    dv = pl.pallas_call(
        functools.partial(_dv_kernel, **kw),
        out_shape=jax.ShapeDtypeStruct((B, T, H, V), out_dtype),
        grid=(V // BVd, B * H, T // BT),
        compiler_params=dv_params,
        interpret=interpret,
        name="dsla_bwd_dv",
    )(a, k, do, g1, g2, dl, e, ds_end)
    return dv
