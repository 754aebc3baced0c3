"""DSLA one-pass forward for GPUs (Triton lowering, v8: `GpuConfig.fwd = "onepass"`).

The split forward (`pallas_gpu.fwd_intra_gpu` -> `fwd_rec_gpu`) stores float32 decayed queries and keys between its
kernels: ~2.1 GB of traffic at B1 T8192 H32 D128, a floor of ~0.7 ms before any latency. Here the sequential kernel
recomputes them from the inputs instead:

* `pallas_gpu.fwd_intra_gpu(decayed=False)`: every chunk in parallel, the intra-chunk term only,
  o_intra = scale sum_s w_s A_s v (float32), with its exact fix-up pass (and the scores A under differentiation).
* `seg_states_onepass_gpu`: each of the first P - 1 segments' state contributions from zero (and its total decay);
  the caller chains the P summaries in XLA (`pallas._chain`).
* `fwd_onepass_gpu`: one program per (value tile, batch x head, segment) walks its segment's chunks with both states
  in registers, cut into key tiles ([BK, BV] each: 2 K / BK tiles; the state rows of different key channels never
  mix, so a key tile is a self-contained recurrence). Per chunk and (key tile, state), with b the in-chunk inclusive
  gate cumsum and bL its total (every exponent <= 0, so this needs no fast / exact paths):

      o += scale w_s (q exp(b)) S,  S <- diag(exp(bL)) S + (k exp(bL - b))^T v,

  on top of o_intra: q, k, v, g1, g2 and o_intra are read once per value tile, o written once.

Putting the intra-chunk scores into the sequential kernel too (one pass over the inputs in all) made it spill
(`scripts/triton_resources.py`: 512 bytes of stack at 8 warps, up to 2.5 KB in other tilings), so they stay in
the parallel kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from dsla_jax.ops.dsla.pallas_gpu import GpuConfig, _compiler_params, _cumsum_rows, _mm

f32 = jnp.float32


def _cumsum_mode(cfg: GpuConfig, gate_dtype) -> str | None:
    """`_cumsum_rows` mode of the one-pass kernels: "scan", or "bf16" (a 0/1 matmul on bfloat16 tensor cores,
    exact for bfloat16 gates: their products with 0 / 1 are exact and accumulate in float32; float32 gates fall
    back to the scan)."""
    if cfg.onepass_cumsum not in ("scan", "bf16"):
        raise ValueError(f"GpuConfig.onepass_cumsum must be 'scan' or 'bf16', got {cfg.onepass_cumsum!r}")
    return "bf16" if cfg.onepass_cumsum == "bf16" and gate_dtype == jnp.bfloat16 else None


def _decayed(q, k, g, tril):
    """(q exp(b) or None, k exp(bL - b), bL) for one [BT, BK] tile of one state."""
    b = _cumsum_rows(g, tril)
    bL = jnp.sum(g, axis=0)
    kd = k * jnp.exp(jnp.minimum(bL[None, :] - b, 0.0))
    return (None if q is None else q * jnp.exp(b)), kd, bL


def _onepass_kernel(q_ref, k_ref, v_ref, g1_ref, g2_ref, *refs, H, BT, BK, BV, NC, tril, sd, mode):
    """mode "seg": the segment's state contribution from zero and its decay (refs: s, d); "main": outputs from
    the entering states (refs: w, o_intra, s_in, o, s_out)."""
    iv, bh, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)  # value tiles adjacent: L2 reuse
    b, h = lax.div(bh, H), lax.rem(bh, H)  # non-negative: no floor-division selects
    vs = pl.ds(iv * BV, BV)
    nk = k_ref.shape[-1] // BK
    gates = (g1_ref, g2_ref)
    main = mode == "main"
    if main:
        w_ref, oi_ref, sin_ref, o_ref, sout_ref = refs
        w = (w_ref[0], w_ref[1])  # scale included by the caller
        init = tuple(sin_ref[bh, p, s, pl.ds(kt * BK, BK), vs] for s in range(2) for kt in range(nk))
    else:
        s_ref, d_ref = refs
        init = tuple(jnp.zeros((BK, BV), f32) for _ in range(2 * nk)) + tuple(
            jnp.ones((BK,), f32) for _ in range(2 * nk)
        )

    def body(n, carry):
        c = p * NC + n
        ts = pl.ds(c * BT, BT)
        states, decays = list(carry[: 2 * nk]), list(carry[2 * nk :])
        v = v_ref[b, ts, h, vs].astype(f32)  # [BT, BV]
        o = oi_ref[bh, ts, vs] if main else None
        for kt in range(nk):  # unrolled: the key tiles' states are separate register carries
            ks = pl.ds(kt * BK, BK)
            k = k_ref[b, ts, h, ks].astype(f32)  # [BT, BK]
            q = q_ref[b, ts, h, ks].astype(f32) if main else None
            for s in range(2):
                i = s * nk + kt
                qd, kd, bL = _decayed(q, k, gates[s][b, ts, h, ks].astype(f32), tril)
                ebl = jnp.exp(bL)
                if main:
                    o = o + w[s] * _mm(qd, states[i], sd)
                else:
                    decays[i] = decays[i] * ebl
                states[i] = ebl[:, None] * states[i] + _mm(kd, v, sd, ta=True)
        if main:
            o_ref[b, ts, h, vs] = o.astype(o_ref.dtype)
        return tuple(states) + tuple(decays)

    out = lax.fori_loop(0, NC, body, init)
    for s in range(2):
        for kt in range(nk):
            ks = pl.ds(kt * BK, BK)
            if main:  # every segment writes its final states (no `pl.when`); the caller keeps the last
                sout_ref[bh, p, s, ks, vs] = out[s * nk + kt]
            else:
                s_ref[bh, p, s, ks, vs] = out[s * nk + kt]
                d_ref[bh, p, iv, s, ks] = out[2 * nk + s * nk + kt]  # equal over value tiles; the caller keeps 0


def _tiles(cfg: GpuConfig, K: int, V: int) -> tuple[int, int]:
    BK, BV = min(cfg.onepass_block_k, K), min(cfg.onepass_block_v, V)
    if K % BK or V % BV:
        raise ValueError(f"onepass tiles ({BK}, {BV}) must divide the head dims ({K}, {V})")
    return BK, BV


def seg_states_onepass_gpu(k, v, g1, g2, *, P: int, count: int, cfg: GpuConfig, interpret=False):
    """State contributions of segments 0 .. count - 1 from zero, both states.

    Args:
        k, g1, g2: [B, T, H, K]; v: [B, T, H, V]; T a multiple of P * chunk.

    Returns:
        summaries [B * H, count, 2, K, V] and total decays (products of exp(bL)) [B * H, count, nv, 2, K], both
        float32 (nv = V / BV value tiles, all equal).
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    BT = cfg.chunk
    BK, BV = _tiles(cfg, K, V)
    NC = T // (P * BT)
    kernel = functools.partial(
        _onepass_kernel, H=H, BT=BT, BK=BK, BV=BV, NC=NC, tril=_cumsum_mode(cfg, g1.dtype), sd=cfg.state_dot, mode="seg"
    )
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((B * H, count, 2, K, V), f32),
            jax.ShapeDtypeStruct((B * H, count, V // BV, 2, K), f32),
        ),
        grid=(V // BV, B * H, count),
        compiler_params=_compiler_params(cfg.onepass_num_warps, cfg.onepass_num_stages, interpret),
        interpret=interpret,
        name="dsla_seg_states_onepass",
    )(k, k, v, g1, g2)


def fwd_onepass_gpu(q, k, v, g1, g2, w, oi, s_in, *, scale: float, cfg: GpuConfig, P: int, interpret=False):
    """Outputs and final states given the intra-chunk outputs and the states entering each segment.

    Args:
        q, k, g1, g2: [B, T, H, K] (T a multiple of P * chunk); v: [B, T, H, V]; w: [2] float32 mix;
        oi: [B * H, T, V] float32 intra-chunk outputs (`pallas_gpu.fwd_intra_gpu`);
        s_in: [B * H, P, 2, K, V] float32.

    Returns:
        o [B, T, H, V] in q's dtype and each segment's final states [B * H, P, 2, K, V] float32.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT = cfg.chunk
    BK, BV = _tiles(cfg, K, V)
    kernel = functools.partial(
        _onepass_kernel,
        H=H,
        BT=BT,
        BK=BK,
        BV=BV,
        NC=T // (P * BT),
        tril=_cumsum_mode(cfg, g1.dtype),
        sd=cfg.state_dot,
        mode="main",
    )
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((B, T, H, V), q.dtype), jax.ShapeDtypeStruct((B * H, P, 2, K, V), f32)),
        grid=(V // BV, B * H, P),
        compiler_params=_compiler_params(cfg.onepass_num_warps, cfg.onepass_num_stages, interpret),
        interpret=interpret,
        name="dsla_fwd_onepass",
    )(q, k, v, g1, g2, w * scale, oi, s_in)
