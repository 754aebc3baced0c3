"""The split forward's recurrent kernel with both value tiles of a head in one program (`GpuConfig.rec_pair`):
`fwd_rec_pair_mgpu`, twin of `pallas_gpu_rec_mgpu.fwd_rec_mgpu` (and of the Triton `pallas_gpu.fwd_rec_gpu`).

Per program (pair of 64-column value tiles, batch x head, segment) two warpgroups, one per value tile, walk the
segment's chunks; warpgroup w holds both states of its tile transposed, S_s^T [BV, K] float32 (WGMMA
accumulators), and per chunk computes the output transposed, with the state as the left operand in registers:

    o^T   = o_intra^T + sum_s S_s,hi^T qd_s,hi^T + S_s,hi^T qd_s,lo^T + S_s,lo^T qd_s,hi^T   (bf16 WGMMAs)
    S_s^T = S_s^T diag(exp(bL_s)) + v^T (kd_s,hi + kd_lo)                                   (bf16 WGMMAs)

(hi, lo: bfloat16 halves; the dropped lo x lo products are ~2^-16 relative, finer than the tf32 output product of
`fwd_rec_mgpu`). The state never goes through shared memory: that kernel's 64 KB tf32 staging of S^T (the right
operand of a tf32 WGMMA, which cannot take its left one from registers) is gone, and the two warpgroups read one
copy of qd's and kd's tiles (64 KB each) instead of a program per value tile reading its own. o_intra's float32 tile
is read transposed and o^T is stored transposed (the WGMMA_TRANSPOSED register layout), so o and o_intra keep their
[T, V] layouts.

Each warpgroup copies half of the shared tiles (the planes of state w) and its own o_intra, v and exp(bL) tiles; a
shared tile is copied again for the next chunk once both warpgroups have read it (a two-arrival barrier per group:
qd, kd). Shared memory at K = V = 128: qd, kd 64 KB each, per warpgroup v 8 KB, o_intra 16 KB, o's staging 8 KB:
~193 KB, one program per SM.

States enter and leave as bfloat16 halves of S^T ([B H, P, 2, 2, V, K]: segment, state, hi / lo), staged through the
qd (warpgroup 0) and kd (warpgroup 1) tiles before the first chunk and after the last.
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
)
from dsla_jax.ops.dsla.pallas_gpu_rec_mgpu import _wait

f32 = jnp.float32
bf16 = jnp.bfloat16
TILE = 64  # tokens per chunk (WGMMA rows of the update, columns of o^T), value columns per warpgroup


def pair_problem(chunk: int, K: int, V: int, dtype, operand: str = "v") -> str | None:
    """Why the paired kernels (this one, `pallas_gpu_seq_pair_mgpu`'s and `pallas_gpu_dv_pair_mgpu`'s) cannot take
    these shapes and their 16-bit operand's dtype, or None: 64-token chunks, key dim 64 or 128 (here a warpgroup holds
    two [64, K] float32 states and one state's halves in registers; the backward's kernels stage two [K, 64] float32
    tiles per warpgroup in shared memory), V a multiple of 128 (two 64-column tiles per program) and a bfloat16
    `operand` (its WGMMAs meet bfloat16 halves)."""
    if chunk != TILE or K not in (64, 128) or V % (2 * TILE):
        return f"chunk 64, K in (64, 128), V % 128 == 0 (got chunk {chunk}, K={K}, V={V})"
    if jnp.dtype(dtype) != jnp.dtype(bf16):
        return f"bfloat16 {operand}, got {jnp.dtype(dtype).name}"
    return None


def check_pair(what: str, y: jax.Array, P: int, chunk: int, operand: str = "v", **planes: jax.Array) -> None:
    """Raise a clear error unless a paired kernel (`what`) can take y [B, T, H, V] (its bfloat16 operand, named
    `operand`), P segments of `chunk`-token chunks and `planes`, each [4, B H, T, K] bfloat16 halves."""
    B, T, H, V = y.shape
    K = next(iter(planes.values())).shape[-1]
    problem = pair_problem(chunk, K, V, y.dtype, operand)
    if problem is None and T % (P * chunk):
        problem = f"T={T} a multiple of segments x chunk ({P} x {chunk})"
    if problem is None and any(x.dtype != bf16 or x.shape != (4, B * H, T, K) for x in planes.values()):
        got = ", ".join(f"{x.dtype}{x.shape}" for x in planes.values())
        problem = f"{', '.join(planes)} as [4, B H, T, K] bfloat16 halves (got {got})"
    if problem is not None:
        raise ValueError(f"the Mosaic GPU paired {what} needs {problem}")


def fwd_rec_pair_mgpu(
    qd: jax.Array,
    kd: jax.Array,
    ebl: jax.Array,
    v: jax.Array,
    oi: jax.Array,
    s_in: jax.Array,
    *,
    P: int,
    chunk: int = TILE,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """o and each segment's final states from the split intra kernel's outputs (all segments in parallel).

    Args:
        qd: [4, B * H, T, K] bfloat16 halves of the decayed, scaled and mixed queries, planes 2 s (hi), 2 s + 1 (lo)
            for state s (`pallas_gpu_rec_mgpu.split_kd` of the float32 ones).
        kd: [4, B * H, T, K] bfloat16 halves of the decayed keys, the same planes.
        ebl: [2, B * H, T / chunk, K] float32 chunk decays exp(bL).
        v: [B, T, H, V] bfloat16.
        oi: [B * H, T, V] float32 intra-chunk outputs.
        s_in: [B * H, P, 2, 2, V, K] bfloat16 halves of the transposed states entering each segment
            (`pallas_gpu_fused_mgpu.split_states`).
        P: segments (T a multiple of P chunks); chunk: 64.

    Returns:
        o [B, T, H, V] bfloat16 and the segments' final states as halves, [B * H, P, 2, 2, V, K] bfloat16.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    check_pair("recurrent kernel", v, P, chunk, qd=qd, kd=kd)
    B, T, H, V = v.shape
    K = qd.shape[-1]
    BT = BV = TILE
    NC = T // (P * BT)
    acc = plgpu.Layout.WGMMA
    sw32, sw16 = swizzles()
    ld, mma = kernel_ops(interpret)
    # TMA barriers, one copy each: qd planes QB + i, kd planes KB + i, warpgroup w's o_intra OB + w, v VB + w,
    # exp(bL) EB + w, entering state planes SB + 4 w + i.
    QB, KB, OB, VB, EB, SB = 0, 4, 8, 10, 12, 14

    def body(qd_ref, kd_ref, ebl_ref, v_ref, oi_ref, sin_ref, o_ref, sout_ref, *scratch):
        qd_sm, kd_sm, oi_sm, v_sm, e_sm, o_sm, bar, free = scratch
        iv, bh, p = (lax.axis_index(n) for n in ("iv", "bh", "p"))
        b, h = lax.div(bh, H), lax.rem(bh, H)
        cp = plgpu.copy_gmem_to_smem
        c0 = p * NC

        def thread(w: int) -> None:
            vs = pl.ds((2 * iv + w) * BV, BV)
            st_sm = (qd_sm, kd_sm)[w]  # where this warpgroup's states enter and leave

            def ts(c):
                return pl.ds(c * BT, BT)

            def fetch_qd(c):  # the planes of state w
                for i in (2 * w, 2 * w + 1):
                    cp(qd_ref.at[i, bh, ts(c)], qd_sm.at[i], bar.at[QB + i])

            def fetch_kd(c):
                for i in (2 * w, 2 * w + 1):
                    cp(kd_ref.at[i, bh, ts(c)], kd_sm.at[i], bar.at[KB + i])

            def fetch_own(c):  # this warpgroup's o_intra (with the output's inputs) and v, exp(bL) (the update's)
                cp(oi_ref.at[bh, ts(c), vs], oi_sm.at[w], bar.at[OB + w])
                cp(v_ref.at[b, ts(c), h, vs], v_sm.at[w], bar.at[VB + w])
                cp(ebl_ref.at[:, bh, c], e_sm.at[w], bar.at[EB + w])

            for s in range(2):
                for half in range(2):
                    cp(sin_ref.at[bh, p, s, half, vs], st_sm.at[2 * s + half], bar.at[SB + 4 * w + 2 * s + half])
            fetch_own(c0)
            _wait(bar, SB + 4 * w, 4)
            init = tuple(
                ld(st_sm.at[2 * s], acc).astype(f32) + ld(st_sm.at[2 * s + 1], acc).astype(f32) for s in range(2)
            )
            for i in range(2):  # both warpgroups have read their entering states: the tiles take chunk c0
                plgpu.barrier_arrive(free.at[i])
                plgpu.barrier_wait(free.at[i])
            fetch_qd(c0)
            fetch_kd(c0)

            def step(n, carry):
                c = c0 + n
                more = n + 1 < NC
                _wait(bar, QB, 4)
                _wait(bar, OB + w, 1)
                ot = load_transposed(oi_sm.at[w], interpret)  # [BV, BT]
                for s in range(2):  # one state's halves live at a time
                    sh, sl = halves(carry[s])
                    qh, ql = ("T", qd_sm.at[2 * s]), ("T", qd_sm.at[2 * s + 1])  # [K, BT]
                    ot = mma(ot, [(sh, qh), (sh, ql), (sl, qh)])
                plgpu.barrier_arrive(free.at[0])  # this warpgroup has read qd(c)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous chunk's o has left o_sm
                store_transposed(o_sm.at[w], ot, interpret)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_sm.at[w], o_ref.at[b, ts(c), h, vs])

                @pl.when(more)
                def _():
                    plgpu.barrier_wait(free.at[0])
                    fetch_qd(c + 1)

                _wait(bar, KB, 4)
                _wait(bar, VB + w, 1)
                _wait(bar, EB + w, 1)
                vt = ("T", v_sm.at[w])  # [BV, BT]
                new = []
                for s in range(2):
                    e = lax.broadcast_in_dim(ld(e_sm.at[w, s], acc.reduce(0)), (BV, K), [1])
                    new.append(mma(carry[s] * e, [(vt, kd_sm.at[2 * s]), (vt, kd_sm.at[2 * s + 1])]))
                plgpu.barrier_arrive(free.at[1])  # this warpgroup has read kd(c)

                @pl.when(more)
                def _():
                    fetch_own(c + 1)
                    plgpu.barrier_wait(free.at[1])
                    fetch_kd(c + 1)

                return tuple(new)

            final = lax.fori_loop(0, NC, step, init)
            for i in range(2):  # the last chunk's qd, kd tiles read by both warpgroups: st_sm takes the states
                plgpu.barrier_wait(free.at[i])
            for s in range(2):
                split_halves(final[s], st_sm.at[2 * s], st_sm.at[2 * s + 1])
            plgpu.commit_smem()
            for s in range(2):
                for half in range(2):
                    plgpu.copy_smem_to_gmem(st_sm.at[2 * s + half], sout_ref.at[bh, p, s, half, vs])
            plgpu.wait_smem_to_gmem(0)

        per_warpgroup(thread)

    kernel = launch_pair(
        body,
        name="dsla_fwd_rec_pair_mgpu",
        interpret=interpret,
        out_type=(jax.ShapeDtypeStruct((B, T, H, V), bf16), jax.ShapeDtypeStruct(s_in.shape, bf16)),
        grid=(V // (2 * BV), B * H, P),
        grid_names=("iv", "bh", "p"),
        scratch_types=[
            plgpu.SMEM((4, BT, K), bf16, transforms=sw16),  # qd halves; warpgroup 0's states enter / leave here
            plgpu.SMEM((4, BT, K), bf16, transforms=sw16),  # kd halves; warpgroup 1's states
            plgpu.SMEM((2, BT, BV), f32, transforms=sw32),  # o_intra, per warpgroup
            plgpu.SMEM((2, BT, BV), bf16, transforms=sw16),  # v
            plgpu.SMEM((2, 2, K), f32),  # exp(bL)
            plgpu.SMEM((2, BT, BV), bf16, transforms=sw16),  # o, staged for its TMA store
            plgpu.Barrier(num_barriers=SB + 8),
            plgpu.Barrier(num_arrivals=2, num_barriers=2),  # qd (0), kd (1) read by both warpgroups
        ],
    )
    return kernel(qd, kd, ebl, v, oi, s_in)
