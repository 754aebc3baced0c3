"""The split forward's intra-chunk kernel on Mosaic GPU (`GpuConfig.intra_mosaic`, the default on Hopper cards):
`fwd_intra_mgpu`, twin of the fast path of `pallas_gpu._intra_kernel` (mode "fast", decayed, split_dtype
"kd-bf16x2"), and `fwd_intra_mgpu_fixed`, which adds the Triton fix-up launch for the chunks past the decay bound, so
that it returns what `pallas_gpu.fwd_intra_gpu` returns with that split_dtype.

One program (one warpgroup) per (batch x head, chunk), all in parallel; no value-tile axis: the value tiles would
each redo the gate cumsums, exponentials and stores of qd / kd, and the live set fits in registers without one
(the score accumulator A [64, 64] float32, a 64-key half of q and k in bfloat16, a few [64, 64] float32
temporaries). The key dim goes in 64-column halves, state by state; per half and state s, with b the chunk-local
inclusive cumsum of g_s, bL its last row (from XLA: `pallas_gpu.chunk_gate_sums`), m = bL / 2, lim = thresh / 2 and
d = clip(b - m, -lim, lim) (`pallas_gpu._fast_factors`):

    b    = Tri g_s                              bf16 WGMMA with a 0 / 1 lower triangle (exact for bf16 gates)
    qd_s = round_tf32(((q exp(d)) exp(m)) w_s)  w_s = scale times the mix weight; float32, stored by TMA
    kd_s = (k exp(-d)) exp(m)                   stored as bfloat16 halves hi + lo by TMA; the scores' right operand
    A   += x_hi kd_hi^T + x_hi kd_lo^T + x_lo kd_hi^T,   x = q exp(d) w_s exp(min(-m, lim)) split in registers

(bf16 WGMMAs, the left operand in registers; the dropped x_lo kd_lo^T is ~2^-16 relative). x kd_s^T = w_s (q
exp(d)) (k exp(-d))^T, the fast path's scores, because exp(min(-m, lim)) exp(m) = 1 wherever the chunk's decay
range max_K(-bL) <= thresh (the chunks this kernel is exact for); elsewhere every factor stays within exp(+-lim)
(finite values) and the chunk is flagged in XLA, from bL, for the Triton fix-up. Every exponent is bounded. Then
A = sum_s w_s A_s is masked to j <= i (the same triangle, read back as float32), stored (the backward's residual),
split into bfloat16 halves in registers, and o_intra = A_hi v + A_lo v per 64-column value tile. exp(bL) is taken
from bL in XLA.

Shared memory (Mosaic GPU's count at lowering, JAX 0.10.2): 108,648 bytes = 106.1 KB at K = V = 128, so two programs
fit an SM's 228 KB (one program's loads and stores overlap the other's work); 66.1 KB at K = V = 64, 187.2 KB at
K = V = 256. q, k, g1, g2 and v sit as [64, 64] bfloat16 tiles, all copied at the start, beside the cumsum's
triangle and one float32 staging tile that every float32 output (qd, A, o_intra) passes through on its way out by
TMA. kd's halves are staged in tiles whose inputs are used up: kd_hi in the gate tile the cumsum just read, kd_lo
in the k (state 0) or q (state 1) tile of the half, whose values are held in registers by then. No reductions
across warps (bL comes from XLA).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dsla_jax.ops.dsla.mgpu import halves, kernel_ops, launch, row_minus_col, split_halves, swizzles, zeros
from dsla_jax.ops.dsla.pallas_gpu import (
    KD_HALVES,
    THRESH,
    GpuConfig,
    chunk_gate_sums,
    fwd_intra_fixup_gpu,
    round_tf32,
)
from dsla_jax.ops.dsla.pallas_gpu_rec_mgpu import _wait

f32 = jnp.float32
bf16 = jnp.bfloat16
TILE = 64  # key and value columns per tile, tokens per chunk (WGMMA rows)


def intra_problem(q: jax.Array, k: jax.Array, v: jax.Array, g1: jax.Array, g2: jax.Array, chunk: int) -> str | None:
    """Why `fwd_intra_mgpu` cannot take these inputs, or None: 64-token chunks, key and value dims multiples of 64,
    T a multiple of the chunk, and bfloat16 q, k, v, g1, g2 (kd's bfloat16 halves are staged in the tiles of q, k
    and the gates; A's halves meet v in a bf16 WGMMA)."""
    K, V, T = q.shape[-1], v.shape[-1], q.shape[1]
    if chunk != TILE or K % TILE or V % TILE or T % chunk:
        return f"chunk 64, K % 64 == 0, V % 64 == 0, T % chunk == 0 (got chunk {chunk}, K={K}, V={V}, T={T})"
    dtypes = {name: jnp.dtype(x.dtype).name for name, x in (("q", q), ("k", k), ("v", v), ("g1", g1), ("g2", g2))}
    if set(dtypes.values()) != {"bfloat16"}:
        return f"bfloat16 q, k, v, g1, g2, got {dtypes}"
    return None


def fwd_intra_mgpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g1: jax.Array,
    g2: jax.Array,
    w: jax.Array,
    bl: jax.Array,
    *,
    scale: float,
    chunk: int = 64,
    scores: bool = True,
    thresh: float = THRESH,
    qd_halves: bool = False,
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
    """The split forward's intra-chunk terms by the fast path, every chunk in parallel (twin of
    `pallas_gpu._intra_kernel` with mode "fast", decayed, split_dtype "kd-bf16x2"). Exact only in chunks whose decay
    range max over K and both states of -bL is <= thresh; `fwd_intra_mgpu_fixed` redoes the others.

    Args:
        q, k, g1, g2: [B, T, H, K] bfloat16; v: [B, T, H, V] bfloat16; w: [2] float32 mix; bl: [2, B * H, N, K]
            float32 per-chunk gate sums (`pallas_gpu.chunk_gate_sums`), N = T / chunk.
        scale: the output scale; chunk: BT (64); scores: also return A; thresh: the fast path's decay range bound
            (`GpuConfig.thresh`: the factors are clamped to exp(+-thresh / 2)).
        qd_halves: write qd as bfloat16 halves [4, B * H, T, K] (planes 2 s, 2 s + 1; split_dtype "qkd-bf16x2", the
            paired recurrent kernel's operand) instead of tf32-rounded float32. They are staged in v's tiles, so v is
            copied in after the key loop; needs V >= 128 (two value tiles).

    Returns:
        qd [2, B * H, T, K] float32 = round_tf32(scale w_s q exp(b_s)), kd [4, B * H, T, K] bfloat16 (hi, lo halves
        of k exp(bL_s - b_s) on planes 2 s, 2 s + 1), ebl [2, B * H, N, K] = exp(bL_s) (XLA), o_intra [B * H, T, V]
        float32 = sum_s scale w_s A_s v and, with `scores`, A [B * H, T, chunk] float32 = scale sum_s w_s A_s, both
        masked to j <= i.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    B, T, H, K = q.shape
    V = v.shape[-1]
    problem = intra_problem(q, k, v, g1, g2, chunk)
    if problem is not None:
        raise ValueError(f"the Mosaic GPU intra kernel needs {problem}")
    BT = BK = BV = TILE
    N, nk, nv = T // BT, K // BK, V // BV
    if qd_halves and nv < 2:
        raise ValueError(f"the Mosaic GPU intra kernel stages qd's halves in two value tiles: V >= 128, got V={V}")
    lim = 0.5 * thresh
    acc = plgpu.Layout.WGMMA
    sw32, sw16 = swizzles()
    ld, mma = kernel_ops(interpret)
    wv = jnp.broadcast_to((w.astype(f32) * scale)[:, None], (2, BK))  # scale w_s, as the Triton kernel forms it
    # Barriers, one copy each: bL halves 0 .. nk - 1, w nk, q / k of half j QK + 2 j + 0 / 1, g_s of half j
    # GB + 2 j + s, v tiles VB + i.
    QK = nk + 1
    GB = QK + 2 * nk
    VB = GB + 2 * nk

    def body(w_ref, q_ref, k_ref, v_ref, g1_ref, g2_ref, bl_ref, qd_ref, kd_ref, oi_ref, *rest):
        a_ref, scratch = (rest[0], rest[1:]) if scores else (None, rest)
        q_sm, k_sm, g_sm, v_sm, tri_sm, bl_sm, w_sm, f_sm, bar = scratch
        bh, c = lax.axis_index("bh"), lax.axis_index("c")
        b, h = lax.div(bh, H), lax.rem(bh, H)
        ts = pl.ds(c * BT, BT)
        cp = plgpu.copy_gmem_to_smem

        for j in range(nk):
            cp(bl_ref.at[:, bh, c, pl.ds(j * BK, BK)], bl_sm.at[j], bar.at[j])
        cp(w_ref, w_sm, bar.at[nk])
        for j in range(nk):
            ks = pl.ds(j * BK, BK)
            cp(q_ref.at[b, ts, h, ks], q_sm.at[j], bar.at[QK + 2 * j])
            cp(k_ref.at[b, ts, h, ks], k_sm.at[j], bar.at[QK + 2 * j + 1])
            for s, g_ref in enumerate((g1_ref, g2_ref)):
                cp(g_ref.at[b, ts, h, ks], g_sm.at[s, j], bar.at[GB + 2 * j + s])

        def fetch_v():
            for i in range(nv):
                cp(v_ref.at[b, ts, h, pl.ds(i * BV, BV)], v_sm.at[i], bar.at[VB + i])

        if not qd_halves:  # else v's tiles stage qd's halves first
            fetch_v()
        # The 0 / 1 lower triangle [i, t] = 1 where t <= i, built while the copies fly: the cumsum's left operand,
        # and the causal mask of the scores at the end.
        d = row_minus_col(BT, acc, interpret)
        tri_sm[...] = jnp.clip(1.0 + d, 0.0, 1.0).astype(tri_sm.dtype)
        plgpu.commit_smem()

        def cols(x):  # a [BK] vector (per key channel) -> [BT, BK]
            return lax.broadcast_in_dim(x, (BT, BK), [1])

        _wait(bar, nk, 1)
        a = zeros((BT, BT), acc, interpret)
        for j in range(nk):
            ks = pl.ds(j * BK, BK)
            _wait(bar, j, 1)
            _wait(bar, QK + 2 * j, 2)
            qj, kj = ld(q_sm.at[j], acc), ld(k_sm.at[j], acc)  # held in registers: their tiles take kd_lo below
            for s in range(2):
                _wait(bar, GB + 2 * j + s, 1)
                gb = mma(zeros((BT, BK), acc, interpret), [(tri_sm, g_sm.at[s, j])])  # b: inclusive cumsum
                m = 0.5 * ld(bl_sm.at[j, s], acc.reduce(0))
                em, ws = jnp.exp(m), ld(w_sm.at[s], acc.reduce(0))
                wsi = ws * jnp.exp(jnp.minimum(-m, lim))  # w_s exp(-m), exact where this kernel is
                dd = jnp.minimum(jnp.maximum(gb - cols(m), -lim), lim)
                qf = qj.astype(f32) * jnp.exp(dd)
                kf = kj.astype(f32) * jnp.exp(-dd)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # f_sm has left; also a warpgroup barrier: q_sm,
                if qd_halves:  # k_sm of this half are read (kd_lo goes there)
                    split_halves(qf * cols(em) * cols(ws), v_sm.at[0], v_sm.at[1])
                else:
                    f_sm[...] = round_tf32(qf * cols(em) * cols(ws))
                hi_sm, lo_sm = g_sm.at[s, j], (k_sm, q_sm)[s].at[j]
                split_halves(kf * cols(em), hi_sm, lo_sm)
                plgpu.commit_smem()
                if qd_halves:
                    plgpu.copy_smem_to_gmem(v_sm.at[0], qd_ref.at[2 * s, bh, ts, ks])
                    plgpu.copy_smem_to_gmem(v_sm.at[1], qd_ref.at[2 * s + 1, bh, ts, ks])
                else:
                    plgpu.copy_smem_to_gmem(f_sm, qd_ref.at[s, bh, ts, ks])
                plgpu.copy_smem_to_gmem(hi_sm, kd_ref.at[2 * s, bh, ts, ks])
                plgpu.copy_smem_to_gmem(lo_sm, kd_ref.at[2 * s + 1, bh, ts, ks])
                x = qf * cols(wsi)
                xh, xl = halves(x)
                a = mma(a, [(xh, ("T", hi_sm)), (xh, ("T", lo_sm)), (xl, ("T", hi_sm))])
        if qd_halves:  # the last halves have left v's tiles
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            fetch_v()
        a = a * ld(tri_sm, acc).astype(f32)  # masked to j <= i
        if scores:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            f_sm[...] = a
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(f_sm, a_ref.at[bh, ts])
        ah, al = halves(a, v_sm.dtype)
        for i in range(nv):
            _wait(bar, VB + i, 1)
            o = mma(zeros((BT, BV), acc, interpret), [(ah, v_sm.at[i]), (al, v_sm.at[i])])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            f_sm[...] = o
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(f_sm, oi_ref.at[bh, ts, pl.ds(i * BV, BV)])
        plgpu.wait_smem_to_gmem(0)

    out_type = (
        jax.ShapeDtypeStruct((4, B * H, T, K), bf16) if qd_halves else jax.ShapeDtypeStruct((2, B * H, T, K), f32),
        jax.ShapeDtypeStruct((4, B * H, T, K), bf16),
        jax.ShapeDtypeStruct((B * H, T, V), f32),
    )
    if scores:
        out_type += (jax.ShapeDtypeStruct((B * H, T, BT), f32),)
    kernel = launch(
        body,
        name="dsla_fwd_intra_mgpu",
        interpret=interpret,
        reduction_scratch_bytes=0,  # no reductions across warps
        out_type=out_type,
        grid=(B * H, N),
        grid_names=("bh", "c"),
        scratch_types=[
            plgpu.SMEM((nk, BT, BK), q.dtype, transforms=sw16),  # q halves, then kd_lo of state 1
            plgpu.SMEM((nk, BT, BK), k.dtype, transforms=sw16),  # k halves, then kd_lo of state 0
            plgpu.SMEM((2, nk, BT, BK), g1.dtype, transforms=sw16),  # g_s halves, then kd_hi of state s
            plgpu.SMEM((nv, BT, BV), v.dtype, transforms=sw16),
            plgpu.SMEM((BT, BT), g1.dtype, transforms=sw16),  # the 0 / 1 lower triangle
            plgpu.SMEM((nk, 2, BK), f32),  # bL halves
            plgpu.SMEM((2, BK), f32),  # scale w_s
            plgpu.SMEM((BT, BK), f32, transforms=sw32),  # float32 output staging: qd, A, o_intra tiles
            plgpu.Barrier(num_barriers=VB + nv),
        ],
    )
    qd, kd, oi, *a = kernel(wv, q, k, v, g1, g2, bl.astype(f32))
    return (qd, kd, jnp.exp(bl.astype(f32)), oi, *a)


def chunk_flags(bl: jax.Array, thresh: float = THRESH) -> jax.Array:
    """[B * H, N] float32: 1.0 where a chunk's decay range, max over K and both states of -bL, exceeds `thresh` (the
    chunks the fast path is not exact for), from bl [2, B * H, N, K]."""
    return (jnp.max(-bl, axis=(0, 3)) > thresh).astype(f32)


def fwd_intra_mgpu_fixed(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g1: jax.Array,
    g2: jax.Array,
    w: jax.Array,
    *,
    scale: float,
    cfg: GpuConfig,
    interpret: bool = False,
    scores: bool = True,
) -> tuple[jax.Array, ...]:
    """`fwd_intra_mgpu` (fast path, every chunk), then the Triton fix-up launch (`pallas_gpu.fwd_intra_fixup_gpu`)
    for the chunks flagged in XLA from the gate sums: what `pallas_gpu.fwd_intra_gpu` returns with
    `cfg.split_dtype == "kd-bf16x2"` (same signature, same outputs: qd, kd, ebl, o_intra and A with `scores`).

    Args:
        q, k, g1, g2: [B, T, H, K] bfloat16; v: [B, T, H, V] bfloat16; w: [2] float32 mix; cfg: `GpuConfig` (its
            chunk, thresh and the fix-up's tiles).
    """
    if cfg.split_dtype not in KD_HALVES:
        raise ValueError(
            f"the Mosaic GPU intra kernel writes split_dtype 'kd-bf16x2' or 'qkd-bf16x2', got {cfg.split_dtype!r}"
        )
    bl = chunk_gate_sums(g1, g2, cfg.chunk)
    outs = fwd_intra_mgpu(
        q, k, v, g1, g2, w, bl, scale=scale, chunk=cfg.chunk, scores=scores, thresh=cfg.thresh,
        qd_halves=cfg.split_dtype == "qkd-bf16x2", interpret=interpret,
    )  # fmt: skip
    flags = chunk_flags(bl, cfg.thresh)
    return fwd_intra_fixup_gpu(
        q, k, v, g1, g2, w, flags, outs, scale=scale, cfg=cfg, interpret=interpret, scores=scores
    )
