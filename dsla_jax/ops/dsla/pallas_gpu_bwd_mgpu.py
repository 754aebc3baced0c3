"""Mosaic GPU kernels for the DSLA split backward's gradients, every chunk in parallel (`GpuConfig.bwd_dv_mosaic`,
`bwd_dqk_mosaic`; used where the forward ran the Mosaic GPU kernels, `GpuConfig(rec="mosaic")`): `dv_mgpu` (twin
`pallas_gpu_bwd._dv_kernel`) and `dqk_mgpu` (twin `pallas_gpu_bwd._dqk_kernel` with grads_order "split"). One
warpgroup per program, TMA copies, WGMMA on bfloat16 operands: float32 tiles that a product reads transposed (tf32
WGMMA reads both operands K-major only) are split in the kernel into bfloat16 halves, hi + lo, exact to ~2^-16.
Measured against the twins in `docs/benchmarks.md` (v10).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dsla_jax.ops.dsla.mgpu import kernel_ops, launch, swizzles, zeros
from dsla_jax.ops.dsla.pallas_gpu_rec_mgpu import _check, _wait

f32 = jnp.float32
bf16 = jnp.bfloat16


def _halves(x: jax.Array, hi_sm, lo_sm) -> None:
    """Store x [R, C] float32 as bfloat16 halves, x = hi + lo to ~2^-16 relative, for bf16 WGMMAs."""
    hi = x.astype(bf16)
    hi_sm[...] = hi
    lo_sm[...] = (x - hi.astype(f32)).astype(bf16)


def dv_mgpu(
    kd: jax.Array,
    dl: jax.Array,
    e: jax.Array,
    ds_end: jax.Array,
    a: jax.Array,
    do: jax.Array,
    *,
    P: int,
    chunk: int = 64,
    block_v: int = 64,
    out_dtype=None,
    interpret: bool = False,
) -> jax.Array:
    """dv of every chunk in parallel (the split backward's dv kernel, twin `pallas_gpu_bwd._dv_kernel`), from the
    forward's kd halves and mixed scores:

        dv_c = sum_s kd_s (Dloc_s,c + diag(e_s,c) dS_end_s,p(c)) + A_c^T do_c

    One program per (value tile, batch x head, chunk). Each state's adjoint D_s [K, BV] is formed in registers and
    split into bfloat16 halves in shared memory, so kd_hi D_hi + kd_hi D_lo + kd_lo D_hi are bf16 WGMMAs (the
    dropped kd_lo D_lo is ~2^-16 relative); A [BT, BT] float32 is split the same way for A^T do, whose transposed
    operand tf32 WGMMA cannot read. The second state's tiles are copied while the first state's products run.

    Args:
        kd: [4, B * H, T, K] bfloat16 halves of the decayed keys (the forward's); dl: [2, B * H, N, K, V] float32
            segment-local adjoints of the states leaving each chunk; e: [2, B * H, N, K] float32 decays from each
            chunk's end to its segment's end; ds_end: [B * H, P, 2, K, V] float32 adjoints of the states leaving
            each segment; a: [B * H, T, BT] float32 mixed scores (masked, scaled); do: [B, T, H, V] 16-bit.
        out_dtype: dv's dtype (default do's).

    Returns:
        dv [B, T, H, V].
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    B, T, H, V = do.shape
    K = kd.shape[-1]
    BT, BV = chunk, block_v
    _check("dv kernel", BT, BV, K, T, P, do)
    N = T // BT
    NC = N // P
    out_dtype = do.dtype if out_dtype is None else out_dtype
    acc = plgpu.Layout.WGMMA
    sw32, sw16 = swizzles()
    ld, mma = kernel_ops(interpret)
    halves = _halves

    def body(kd_ref, dl_ref, e_ref, de_ref, a_ref, do_ref, dv_ref, *scratch):
        kdh_sm, kdl_sm, dl_sm, de_sm, e_sm, a_sm, ah_sm, al_sm, do_sm, dh_sm, dlo_sm, out_sm, bar = scratch
        iv, bh, c = lax.axis_index("iv"), lax.axis_index("bh"), lax.axis_index("c")
        b, h, p = lax.div(bh, H), lax.rem(bh, H), lax.div(c, NC)
        ts, vs = pl.ds(c * BT, BT), pl.ds(iv * BV, BV)

        def fetch_keys(s, first):  # kd_s hi, lo on first, first + 1
            plgpu.copy_gmem_to_smem(kd_ref.at[2 * s, bh, ts], kdh_sm, bar.at[first])
            plgpu.copy_gmem_to_smem(kd_ref.at[2 * s + 1, bh, ts], kdl_sm, bar.at[first + 1])

        def fetch_adjoint(s, first):  # Dloc_s, dS_end_s on first, first + 1
            plgpu.copy_gmem_to_smem(dl_ref.at[s, bh, c, :, vs], dl_sm, bar.at[first])
            plgpu.copy_gmem_to_smem(de_ref.at[bh, p, s, :, vs], de_sm, bar.at[first + 1])

        # One copy per barrier, each used once: A 0, do 1, e 2, state 0 keys 3-4 and adjoint 5-6, state 1 7-10.
        plgpu.copy_gmem_to_smem(a_ref.at[bh, ts], a_sm, bar.at[0])
        plgpu.copy_gmem_to_smem(do_ref.at[b, ts, h, vs], do_sm, bar.at[1])
        plgpu.copy_gmem_to_smem(e_ref.at[:, bh, c], e_sm, bar.at[2])
        fetch_keys(0, 3)
        fetch_adjoint(0, 5)
        _wait(bar, 0, 1)
        halves(ld(a_sm, acc), ah_sm, al_sm)
        dv = zeros((BT, BV), acc, interpret)
        _wait(bar, 1, 2)
        for s in range(2):
            _wait(bar, 5 if s == 0 else 9, 2)  # the state's adjoint tiles
            ec = lax.broadcast_in_dim(ld(e_sm.at[s], acc.reduce(1)), (K, BV), [0])
            halves(ld(dl_sm, acc) + ec * ld(de_sm, acc), dh_sm, dlo_sm)  # D_s [K, BV]
            plgpu.commit_smem()  # also a warpgroup barrier: dl_sm, de_sm are read

            if s == 0:
                fetch_adjoint(1, 9)
            _wait(bar, 3 if s == 0 else 7, 2)
            pairs = [(kdh_sm, dh_sm), (kdh_sm, dlo_sm), (kdl_sm, dh_sm)]
            if s == 0:
                pairs += [(("T", ah_sm), do_sm), (("T", al_sm), do_sm)]
            dv = mma(dv, pairs)
            if s == 0:
                fetch_keys(1, 7)
        out_sm[...] = dv.astype(out_sm.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_sm, dv_ref.at[b, ts, h, vs])
        plgpu.wait_smem_to_gmem(0)

    kernel = launch(
        body,
        name="dsla_dv_mgpu",
        interpret=interpret,
        out_type=jax.ShapeDtypeStruct((B, T, H, V), out_dtype),
        grid=(V // BV, B * H, N),
        grid_names=("iv", "bh", "c"),
        scratch_types=[
            plgpu.SMEM((BT, K), bf16, transforms=sw16),  # kd_s hi
            plgpu.SMEM((BT, K), bf16, transforms=sw16),  # kd_s lo
            plgpu.SMEM((K, BV), f32, transforms=sw32),  # Dloc_s
            plgpu.SMEM((K, BV), f32, transforms=sw32),  # dS_end_s
            plgpu.SMEM((2, K), f32),  # e
            plgpu.SMEM((BT, BT), f32, transforms=sw32),  # A
            plgpu.SMEM((BT, BT), bf16, transforms=sw16),  # A hi
            plgpu.SMEM((BT, BT), bf16, transforms=sw16),  # A lo
            plgpu.SMEM((BT, BV), do.dtype, transforms=sw16),
            plgpu.SMEM((K, BV), bf16, transforms=sw16),  # D_s hi
            plgpu.SMEM((K, BV), bf16, transforms=sw16),  # D_s lo
            plgpu.SMEM((BT, BV), out_dtype, transforms=sw32 if jnp.dtype(out_dtype).itemsize == 4 else sw16),
            plgpu.Barrier(num_barriers=11),
        ],
    )
    return kernel(kd, dl, e, ds_end, a, do)
