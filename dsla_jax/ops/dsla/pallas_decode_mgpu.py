"""DSLA decode step as a Mosaic GPU kernel (`plgpu.kernel`): the Triton decode kernel's math (`pallas_decode`) with
explicit TMA copies, so the two state tiles are in flight together and the new states leave by TMA stores.

Per program (batch x kv head, value tile of BV columns), one warpgroup:
    S_s' = diag(exp(g_s)) S_s + k^T v            (s = 1, 2; [K, BV] float32 tiles in shared memory, swizzled)
    o_g  = scale * (w_1 q_g S_1' + w_2 q_g S_2')  for the G query heads of the kv head (a reduction over K).
The state tiles are held in registers in the WGMMA layout (K rows x BV columns), the vectors in its row / column
layouts, so every broadcast is free and the read-out is one cross-warp reduction per state and query head.

CPU tests run it in Mosaic GPU's interpreter (`interpret=True`; see `mgpu`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dsla_jax.ops.dsla.mgpu import kernel_ops, launch, swizzles

f32 = jnp.float32


def tiles_problem(K: int, V: int, block_v: int | None) -> str | None:
    """Why this kernel cannot take key dim K, value dim V and value tile block_v (default min(64, V)), or None."""
    BV = min(64, V) if block_v is None else block_v
    if V % BV or BV % 32:
        return f"the Mosaic GPU decode kernel needs block_v={BV} a multiple of 32 dividing V={V}"
    if K % 64:
        return f"the Mosaic GPU decode kernel needs K={K} a multiple of 64 (the WGMMA row tile)"
    return None


def decode_step_mgpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g1: jax.Array,
    g2: jax.Array,
    w: jax.Array,
    s1: jax.Array,
    s2: jax.Array,
    *,
    scale: float,
    block_v: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One decode step of both states on Mosaic GPU (no shape checks: `pallas.dsla_decode_step_pallas` validates).

    Args:
        q: [B, H, K]; k, g1, g2: [B, Hk, K]; v: [B, Hk, V]; w: [2] float32; s1, s2: [B, Hk, K, V] float32.
        block_v: BV, value columns per program (default 64; a multiple of 32 dividing V).
        interpret: run in Mosaic GPU's interpreter on the CPU.

    Returns:
        o [B, H, V] in q's dtype and the new (S1, S2), [B, Hk, K, V] float32.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    B, H, K = q.shape
    Hk, V = v.shape[1], v.shape[2]
    G = H // Hk
    problem = tiles_problem(K, V, block_v)
    if problem:
        raise ValueError(problem)
    BV = min(64, V) if block_v is None else block_v
    BH = B * Hk
    q3 = q.reshape(BH, G, K)
    k2, g12, g22 = (x.reshape(BH, K) for x in (k, g1, g2))
    v2 = v.reshape(BH, V)
    s1r, s2r = s1.reshape(BH, K, V), s2.reshape(BH, K, V)
    tile = plgpu.Layout.WGMMA  # [K, BV]: K % 64 == 0, BV % 8 == 0
    rows, cols_layout = tile.reduce(1), tile.reduce(0)  # vectors along K / along BV
    swizzled = swizzles()[0]  # float32 tiles
    ld, _ = kernel_ops(interpret)

    def body(w_ref, q_ref, k_ref, v_ref, g1_ref, g2_ref, s1_ref, s2_ref, o_ref, s1o_ref, s2o_ref, *scratch):
        s1_sm, s2_sm, q_sm, k_sm, v_sm, g1_sm, g2_sm, o_sm, bar = scratch
        h = lax.axis_index("h")
        cols = pl.ds(lax.axis_index("j") * BV, BV)
        copies = (
            (s1_ref.at[h, :, cols], s1_sm),
            (s2_ref.at[h, :, cols], s2_sm),
            (q_ref.at[h], q_sm),
            (k_ref.at[h], k_sm),
            (v_ref.at[h, cols], v_sm),
            (g1_ref.at[h], g1_sm),
            (g2_ref.at[h], g2_sm),
        )
        for i, (src, dst) in enumerate(copies):  # one barrier per copy: all seven in flight at once
            plgpu.copy_gmem_to_smem(src, dst, bar.at[i])
        for i in range(2, 7):
            plgpu.barrier_wait(bar.at[i])
        kv = lax.broadcast_in_dim(ld(k_sm, rows).astype(f32), (K, BV), [0]) * lax.broadcast_in_dim(
            ld(v_sm, cols_layout).astype(f32), (K, BV), [1]
        )
        o = [None] * G
        for s, (s_sm, g_sm) in enumerate(((s1_sm, g1_sm), (s2_sm, g2_sm))):
            decay = jnp.exp(ld(g_sm, rows).astype(f32))
            plgpu.barrier_wait(bar.at[s])
            new = lax.broadcast_in_dim(decay, (K, BV), [0]) * ld(s_sm, tile) + kv
            s_sm[...] = new  # the new state leaves from where the old one came
            for gi in range(G):
                qg = ld(q_sm.at[gi], rows).astype(f32) * (w_ref[s] * scale)
                og = jnp.sum(lax.broadcast_in_dim(qg, (K, BV), [0]) * new, axis=0)
                o[gi] = og if o[gi] is None else o[gi] + og
        for gi in range(G):
            o_sm[gi] = o[gi].astype(o_sm.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(s1_sm, s1o_ref.at[h, :, cols])
        plgpu.copy_smem_to_gmem(s2_sm, s2o_ref.at[h, :, cols])
        plgpu.copy_smem_to_gmem(o_sm, o_ref.at[h, :, cols])
        plgpu.wait_smem_to_gmem(0)

    kernel = launch(
        body,
        name="dsla_decode_mgpu",
        interpret=interpret,
        out_type=(
            jax.ShapeDtypeStruct((BH, G, V), q.dtype),
            jax.ShapeDtypeStruct((BH, K, V), f32),
            jax.ShapeDtypeStruct((BH, K, V), f32),
        ),
        grid=(BH, V // BV),
        grid_names=("h", "j"),
        scratch_types=[
            plgpu.SMEM((K, BV), f32, transforms=swizzled),
            plgpu.SMEM((K, BV), f32, transforms=swizzled),
            plgpu.SMEM((G, K), q.dtype),
            plgpu.SMEM((K,), k.dtype),
            plgpu.SMEM((BV,), v.dtype),
            plgpu.SMEM((K,), g1.dtype),
            plgpu.SMEM((K,), g2.dtype),
            plgpu.SMEM((G, BV), q.dtype),
            plgpu.Barrier(num_barriers=7),
        ],
    )
    o, s1n, s2n = kernel(w.astype(f32), q3, k2, v2, g12, g22, s1r, s2r)
    return o.reshape(B, H, V), (s1n.reshape(s1.shape), s2n.reshape(s2.shape))
