"""The split backward's dv kernel with both value tiles of a head in one program (`GpuConfig.bwd_pair`):
`dv_pair_mgpu`, twin of `pallas_gpu_bwd_mgpu.dv_mgpu`. Per chunk c,

    dv_c^T = sum_s D_s^T kd_s^T + do_c^T A_c,      D_s = Dloc_s,c + diag(e_s,c) dS_end_s,p(c)   [K, BV]

computed transposed so that each state's adjoint is the register operand of bf16 WGMMAs: D_s^T [BV, K] is read
through transposed views of the Dloc / dS_end tiles (the WGMMA_TRANSPOSED register layout), formed in registers and
split into bfloat16 halves there (D_hi kd_hi + D_hi kd_lo + D_lo kd_hi; the dropped lo x lo is ~2^-16 relative).
dv^T is stored through a transposed view of the do tile it replaces, so dv keeps its [T, V] layout.

One program per (pair of 64-column value tiles, batch x head, chunk), two warpgroups, one per value tile. Shared by
both: kd's two planes of one state at a time (32 KB at K = 128; state 1's are copied once both warpgroups have read
state 0's) and the mixed scores A (float32, split into bfloat16 halves by warpgroup 0). Per warpgroup: the Dloc and
dS_end tiles (float32, 64 KB; state 1's copied once state 0's are in registers), do, exp-decays e. ~210 KB, one
program per SM; the unpaired kernel copies kd and A once per value tile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dsla_jax.ops.dsla.mgpu import (
    halves,
    kernel_ops,
    launch_pair,
    load_transposed,
    per_warpgroup,
    split_halves,
    store_transposed,
    swizzles,
    zeros,
)
from dsla_jax.ops.dsla.pallas_gpu_rec_mgpu import _wait
from dsla_jax.ops.dsla.pallas_gpu_rec_pair_mgpu import check_pair

f32 = jnp.float32
bf16 = jnp.bfloat16
TILE = 64


def dv_pair_mgpu(
    kd: jax.Array,
    dl: jax.Array,
    e: jax.Array,
    ds_end: jax.Array,
    a: jax.Array,
    do: jax.Array,
    *,
    P: int,
    chunk: int = TILE,
    interpret: bool = False,
) -> jax.Array:
    """dv of every chunk in parallel, both value tiles of a head per program.

    Args:
        kd: [4, B * H, T, K] bfloat16 halves of the decayed keys (planes 2 s, 2 s + 1: hi, lo of state s);
        dl: [2, B * H, N, K, V] float32 segment-local adjoints of the states leaving each chunk; e: [2, B * H, N, K]
        float32 decays from each chunk's end to its segment's end; ds_end: [B * H, P, 2, K, V] float32 adjoints of
        the states leaving each segment; a: [B * H, T, 64] float32 mixed scores; do: [B, T, H, V] bfloat16.

    Returns:
        dv [B, T, H, V] bfloat16.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    check_pair("dv kernel", do, P, chunk, "v / do", kd=kd)
    B, T, H, V = do.shape
    K = kd.shape[-1]
    BT = BV = TILE
    N = T // BT
    NC = N // P
    acc = plgpu.Layout.WGMMA
    sw32, sw16 = swizzles()
    ld, mma = kernel_ops(interpret)
    # TMA barriers, one copy each: kd plane w of state s on KB + 2 s + w; A on AB; warpgroup w's do DB + w, e EB + w,
    # Dloc of state s LB + 2 w + s, dS_end of state s SB + 2 w + s.
    KB, AB, DB, EB, LB, SB = 0, 4, 5, 7, 9, 13

    def body(kd_ref, dl_ref, e_ref, de_ref, a_ref, do_ref, dv_ref, *scratch):
        kd_sm, a_sm, ah_sm, al_sm, do_sm, e_sm, dl_sm, de_sm, bar, free, ready = scratch
        iv, bh, c = (lax.axis_index(n) for n in ("iv", "bh", "c"))
        b, h, p = lax.div(bh, H), lax.rem(bh, H), lax.div(c, NC)
        ts = pl.ds(c * BT, BT)
        cp = plgpu.copy_gmem_to_smem

        def thread(w: int) -> None:
            vs = pl.ds((2 * iv + w) * BV, BV)

            def fetch_keys(s):  # this warpgroup's plane of state s (w = 0: hi, 1: lo)
                cp(kd_ref.at[2 * s + w, bh, ts], kd_sm.at[w], bar.at[KB + 2 * s + w])

            def fetch_adjoint(s):
                cp(dl_ref.at[s, bh, c, :, vs], dl_sm.at[w], bar.at[LB + 2 * w + s])
                cp(de_ref.at[bh, p, s, :, vs], de_sm.at[w], bar.at[SB + 2 * w + s])

            def adjoint_t(s):  # D_s^T [BV, K] from the tiles in shared memory, as bfloat16 halves in registers
                _wait(bar, LB + 2 * w + s, 1)
                _wait(bar, SB + 2 * w + s, 1)
                ec = lax.broadcast_in_dim(ld(e_sm.at[w, s], acc.reduce(0)), (BV, K), [1])
                d_t = load_transposed(dl_sm.at[w], interpret) + ec * load_transposed(de_sm.at[w], interpret)
                return halves(d_t)

            if w == 0:
                cp(a_ref.at[bh, ts], a_sm, bar.at[AB])
            cp(do_ref.at[b, ts, h, vs], do_sm.at[w], bar.at[DB + w])
            cp(e_ref.at[:, bh, c], e_sm.at[w], bar.at[EB + w])
            fetch_keys(0)
            fetch_adjoint(0)
            if w == 0:  # A's halves, for both warpgroups
                _wait(bar, AB, 1)
                split_halves(ld(a_sm, acc), ah_sm, al_sm)
                plgpu.commit_smem()
                plgpu.barrier_arrive(ready.at[0])
            _wait(bar, EB + w, 1)
            dh, dlo = adjoint_t(0)
            plgpu.commit_smem()  # also a warpgroup barrier: the adjoint tiles are read
            fetch_adjoint(1)
            _wait(bar, DB + w, 1)
            _wait(bar, KB, 2)
            plgpu.barrier_wait(ready.at[0])
            kh, kl = ("T", kd_sm.at[0]), ("T", kd_sm.at[1])  # [K, BT]
            dot = ("T", do_sm.at[w])  # [BV, BT]
            dv_t = mma(zeros((BV, BT), acc, interpret), [(dh, kh), (dh, kl), (dlo, kh), (dot, ah_sm), (dot, al_sm)])
            plgpu.barrier_arrive(free.at[0])  # this warpgroup has read state 0's keys
            dh, dlo = adjoint_t(1)
            plgpu.barrier_wait(free.at[0])
            fetch_keys(1)
            _wait(bar, KB + 2, 2)
            dv_t = mma(dv_t, [(dh, kh), (dh, kl), (dlo, kh)])
            store_transposed(do_sm.at[w], dv_t, interpret)  # do is read: dv^T goes out through its tile
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(do_sm.at[w], dv_ref.at[b, ts, h, vs])
            plgpu.wait_smem_to_gmem(0)

        per_warpgroup(thread)

    kernel = launch_pair(
        body,
        name="dsla_dv_pair_mgpu",
        interpret=interpret,
        out_type=jax.ShapeDtypeStruct((B, T, H, V), do.dtype),
        grid=(V // (2 * BV), B * H, N),
        grid_names=("iv", "bh", "c"),
        scratch_types=[
            plgpu.SMEM((2, BT, K), bf16, transforms=sw16),  # kd hi, lo of one state, shared
            plgpu.SMEM((BT, BT), f32, transforms=sw32),  # A, shared
            plgpu.SMEM((BT, BT), bf16, transforms=sw16),  # A hi
            plgpu.SMEM((BT, BT), bf16, transforms=sw16),  # A lo
            plgpu.SMEM((2, BT, BV), do.dtype, transforms=sw16),  # do, per warpgroup; then dv
            plgpu.SMEM((2, 2, K), f32),  # e, per warpgroup
            plgpu.SMEM((2, K, BV), f32, transforms=sw32),  # Dloc_s, per warpgroup
            plgpu.SMEM((2, K, BV), f32, transforms=sw32),  # dS_end_s
            plgpu.Barrier(num_barriers=SB + 4),
            plgpu.Barrier(num_arrivals=2, num_barriers=1),  # state 0's keys read by both warpgroups
            plgpu.Barrier(num_arrivals=1, num_barriers=1),  # A's halves written (by warpgroup 0)
        ],
    )
    return kernel(kd, dl, e, ds_end, a, do)
