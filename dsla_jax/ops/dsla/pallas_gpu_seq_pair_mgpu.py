"""The split backward's two sequential passes with both value tiles of a head in one program (`GpuConfig.bwd_pair`):
`chunk_states_pair_mgpu` (twin of `pallas_gpu_rec_mgpu.chunk_states_mgpu`) and `chunk_adjoints_pair_mgpu` (twin of
`chunk_adjoints_mgpu` fed qd's bfloat16 halves). Both walk a segment's chunks with a pair of states per value tile
in their natural layout, M_s [K, BV] float32 (WGMMA accumulators), and per chunk store M_s, then update it:

    M_s <- diag(exp(bL_s)) M_s + (x_s,hi + x_s,lo)^T y       (bf16 WGMMAs, the token contraction read transposed)

state pass: x = kd, y = v, forward in time from the states entering each segment, storing the state entering each
chunk; adjoint pass: x = qd, y = do, backward in time from zero at each segment's end, storing the adjoint of the
state leaving each chunk and, after the segment's first chunk, the segment's local adjoint.

Per program (pair of 64-column value tiles, batch x head, segment) two warpgroups, one per value tile, share one copy
of x's four bfloat16 planes per chunk (the unpaired kernels run a program per value tile, each copying all four):
warpgroup w copies planes 2 w, 2 w + 1 and its own y tile and exp(bL); a plane buffer is copied again once both
warpgroups have read it (a two-arrival barrier), the rest as in the unpaired kernels. Shared memory at K = 128:
x 64 KB, y 16 KB, the states' float32 staging for their TMA stores 2 x 64 KB: ~210 KB, one program per SM.

Layouts: x [4, B H, T, K] bfloat16 (hi, lo per state), ebl [2, B H, N, K] float32, y [B, T, H, V] bfloat16, states
[2, B H, N, K, V] float32, per-segment states [B H, P, 2, K, V] float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dsla_jax.ops.dsla.mgpu import kernel_ops, launch_pair, per_warpgroup, swizzles, zeros
from dsla_jax.ops.dsla.pallas_gpu_rec_mgpu import _wait
from dsla_jax.ops.dsla.pallas_gpu_rec_pair_mgpu import check_pair

f32 = jnp.float32
bf16 = jnp.bfloat16
TILE = 64  # tokens per chunk, value columns per warpgroup


def _pair_pass(x, ebl, y, s_in, *, P: int, reverse: bool, name: str, interpret: bool):
    """The kernel of both passes: `reverse` False is the state pass (s_in [B H, P, 2, K, V] float32 enters each
    segment; returns the states entering every chunk), True the adjoint pass (from zero; returns the adjoints of the
    states leaving every chunk and each segment's local adjoint entering it)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    B, T, H, V = y.shape
    K = x.shape[-1]
    BT = BV = TILE
    N = T // BT
    NC = N // P
    acc = plgpu.Layout.WGMMA
    sw32, sw16 = swizzles()
    ld, mma = kernel_ops(interpret)
    # TMA barriers, one copy each: x planes XB + i, warpgroup w's y YB + w, exp(bL) EB + w, entering states
    # SB + 2 w + s.
    XB, YB, EB, SB = 0, 4, 6, 8

    def body(*refs):
        if reverse:
            x_ref, ebl_ref, y_ref, out_ref, send_ref, *scratch = refs
        else:
            x_ref, ebl_ref, y_ref, sin_ref, out_ref, *scratch = refs
        x_sm, y_sm, e_sm, st_sm, bar, free = scratch
        iv, bh, p = (lax.axis_index(n) for n in ("iv", "bh", "p"))
        b, h = lax.div(bh, H), lax.rem(bh, H)
        cp = plgpu.copy_gmem_to_smem
        step_c = -1 if reverse else 1
        c_first = p * NC + (NC - 1 if reverse else 0)

        def thread(w: int) -> None:
            vs = pl.ds((2 * iv + w) * BV, BV)

            def fetch_x(c):  # the planes of state w
                for i in (2 * w, 2 * w + 1):
                    cp(x_ref.at[i, bh, pl.ds(c * BT, BT)], x_sm.at[i], bar.at[XB + i])

            def fetch_own(c):
                cp(y_ref.at[b, pl.ds(c * BT, BT), h, vs], y_sm.at[w], bar.at[YB + w])
                cp(ebl_ref.at[:, bh, c], e_sm.at[w], bar.at[EB + w])

            def store(values, dsts):  # both states' [K, BV] tiles, once the previous stores have read the staging
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                for s in range(2):
                    st_sm.at[w, s][...] = values[s]
                plgpu.commit_smem()
                for s in range(2):
                    plgpu.copy_smem_to_gmem(st_sm.at[w, s], dsts[s])

            fetch_x(c_first)
            fetch_own(c_first)
            if reverse:
                init = (zeros((K, BV), acc, interpret),) * 2
            else:
                for s in range(2):
                    cp(sin_ref.at[bh, p, s, :, vs], st_sm.at[w, s], bar.at[SB + 2 * w + s])
                _wait(bar, SB + 2 * w, 2)
                init = tuple(ld(st_sm.at[w, s], acc) for s in range(2))

            def step(n, carry):
                c = c_first + step_c * n
                more = n + 1 < NC
                store(carry, [out_ref.at[s, bh, c, :, vs] for s in range(2)])
                _wait(bar, XB, 4)
                _wait(bar, YB + w, 1)
                _wait(bar, EB + w, 1)
                yt = y_sm.at[w]  # [BT, BV]
                new = []
                for s in range(2):
                    e = lax.broadcast_in_dim(ld(e_sm.at[w, s], acc.reduce(1)), (K, BV), [0])
                    new.append(mma(carry[s] * e, [(("T", x_sm.at[2 * s]), yt), (("T", x_sm.at[2 * s + 1]), yt)]))
                plgpu.barrier_arrive(free.at[0])  # this warpgroup has read x(c)

                @pl.when(more)
                def _():
                    fetch_own(c + step_c)
                    plgpu.barrier_wait(free.at[0])
                    fetch_x(c + step_c)

                return tuple(new)

            final = lax.fori_loop(0, NC, step, init)
            plgpu.barrier_wait(free.at[0])  # the last chunk's phase (every phase is observed)
            if reverse:
                store(final, [send_ref.at[bh, p, s, :, vs] for s in range(2)])
            plgpu.wait_smem_to_gmem(0)

        per_warpgroup(thread)

    states = jax.ShapeDtypeStruct((2, B * H, N, K, V), f32)
    kernel = launch_pair(
        body,
        name=name,
        interpret=interpret,
        out_type=(states, jax.ShapeDtypeStruct((B * H, P, 2, K, V), f32)) if reverse else states,
        grid=(V // (2 * BV), B * H, P),
        grid_names=("iv", "bh", "p"),
        scratch_types=[
            plgpu.SMEM((4, BT, K), bf16, transforms=sw16),  # x's halves, shared
            plgpu.SMEM((2, BT, BV), bf16, transforms=sw16),  # y, per warpgroup
            plgpu.SMEM((2, 2, K), f32),  # exp(bL), per warpgroup
            plgpu.SMEM((2, 2, K, BV), f32, transforms=sw32),  # the states' staging, per warpgroup
            plgpu.Barrier(num_barriers=SB + 4),
            plgpu.Barrier(num_arrivals=2, num_barriers=1),  # x read by both warpgroups
        ],
    )
    return kernel(x, ebl, y) if reverse else kernel(x, ebl, y, s_in)


def chunk_states_pair_mgpu(
    kd: jax.Array, ebl: jax.Array, v: jax.Array, s_in: jax.Array, *, P: int, chunk: int = TILE, interpret: bool = False
) -> jax.Array:
    """The state entering every chunk (the split backward's state pass), both value tiles of a head per program.

    Args:
        kd: [4, B * H, T, K] bfloat16 halves of the decayed keys (planes 2 s, 2 s + 1: hi, lo of state s);
        ebl: [2, B * H, N, K] float32 chunk decays exp(bL); v: [B, T, H, V] bfloat16; s_in: [B * H, P, 2, K, V]
        float32 states entering each segment; P segments (T a multiple of P chunks); chunk 64.

    Returns:
        [2, B * H, N, K, V] float32: the states entering every chunk.
    """
    check_pair("state pass", v, P, chunk, "v / do", kd=kd)
    if s_in.shape != (kd.shape[1], P, 2, kd.shape[-1], v.shape[-1]) or s_in.dtype != f32:
        raise ValueError(f"s_in must be [B H, P, 2, K, V] float32, got {s_in.dtype}{s_in.shape}")
    return _pair_pass(kd, ebl, v, s_in, P=P, reverse=False, name="dsla_chunk_states_pair_mgpu", interpret=interpret)


def chunk_adjoints_pair_mgpu(
    qd: jax.Array, ebl: jax.Array, do: jax.Array, *, P: int, chunk: int = TILE, interpret: bool = False
) -> tuple[jax.Array, jax.Array]:
    """The segment-local adjoint of the state leaving every chunk (the split backward's adjoint pass), both value
    tiles of a head per program: D_{c-1} = diag(exp(bL_c)) D_c + qd_c^T do_c from zero at each segment's end.

    Args:
        qd: [4, B * H, T, K] bfloat16 halves of the decayed, scaled and mixed queries (split_dtype "qkd-bf16x2");
        ebl: [2, B * H, N, K] float32; do: [B, T, H, V] bfloat16 output cotangent; P, chunk as above.

    Returns:
        dl [2, B * H, N, K, V] float32 and send [B * H, P, 2, K, V] float32, as `chunk_adjoints_mgpu`.
    """
    check_pair("adjoint pass", do, P, chunk, "v / do", qd=qd)
    return _pair_pass(qd, ebl, do, None, P=P, reverse=True, name="dsla_chunk_adjoints_pair_mgpu", interpret=interpret)
