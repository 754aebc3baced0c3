"""The split backward's dq / dk kernel with two warpgroups per program (`GpuConfig.dqk_pair`): `dqk_pair_mgpu`, twin
of `pallas_gpu_bwd_mgpu.dqk_mgpu` with the intra-chunk terms inside (`flags` given, `GpuConfig.bwd_intra_fused`).

The same grid, one program per (state s x 64-key tile, batch x head, chunk), and the same products; warpgroup w
takes the tile's key columns 32 w .. 32 w + 31. The unpaired kernel runs one warpgroup per SM (202 KB of shared
memory), and it is bound by the latency of its own instruction chain, not by its loads: at B1 T8192 H32 D128 on an
H200, dropping its state-tile copies saved 0.09 of 1.46 ms (v18, call 1). Two warpgroups of half the width fill each
other's stalls. Shared by both: do and v (copied by warpgroup 0), the two 0 / 1 matrices and dA's bfloat16 halves
(written by warpgroup 0, one arrival both wait for). Per warpgroup: q, k, g_s [64, 32], the states' [32, 64] float32
tiles, four [64, 32] bfloat16 tiles (the decayed q, k halves, then H_c^T and D^T's halves, then the gate gradient's
summands), the intra-chunk terms [64, 32] float32 (then the dq / dk shares on their way out) and dg: ~210 KB.

H_c and D enter the WGMMAs transposed from their [32, 64] tiles: H_c^T [64, 32] is read through a transposed view
(`mgpu.load_transposed`) and split into halves, so do H_c^T is do [64, 64] times a [64, 32] right operand. The
boundary term exp(bL) sum_V H_c * D is a column sum of Z = exp(bL) H_c^T * D^T [64, 32], which would cross warps
(Mosaic GPU's reduction scratch is one buffer for the whole program, so two warpgroups must not both reduce across
warps); it goes into the gate gradient's final WGMMA instead: with U (i >= t) + L (i < t) = ones,

    dg = U r + L (k x) + ones Z = U (r + Z) + L (k x + Z)

(the summands' bfloat16 halves carry Z to ~2^-16 where the unpaired kernel adds it in float32). Every bfloat16 tile
has a 64-byte swizzle (a 32-column row is 64 bytes, and a WGMMA's two operands must share their swizzle).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dsla_jax.ops.dsla.mgpu import (
    kernel_ops,
    launch_pair,
    load_transposed,
    per_warpgroup,
    row_minus_col,
    split_halves,
    swizzles,
    zeros,
)
from dsla_jax.ops.dsla.pallas_gpu import THRESH
from dsla_jax.ops.dsla.pallas_gpu_bwd_mgpu import (
    _check_sixteen,
    _fetch_gate,
    _gate_cumsum,
    _intra_products,
    _intra_scores,
)
from dsla_jax.ops.dsla.pallas_gpu_rec_mgpu import _check, _wait

f32 = jnp.float32
bf16 = jnp.bfloat16
HALF = 32  # key columns per warpgroup


def dqk_pair_problem(K: int, V: int, dtype, kv_f32: bool) -> str | None:
    """Why `dqk_pair_mgpu` cannot take these, or None: key dim a multiple of 64, V a multiple of 64, 16-bit gates
    and dk, dg in the inputs' dtype (not the float32 outputs of grouped heads, `kv_f32`)."""
    if K % 64 or V % 64:
        return f"K % 64 == 0 and V % 64 == 0 (got K={K}, V={V})"
    if jnp.dtype(dtype).itemsize != 2 or kv_f32:
        return f"16-bit gates and dk, dg in their dtype (got {jnp.dtype(dtype).name}, kv_f32={kv_f32})"
    return None


def dqk_pair_mgpu(
    w: jax.Array,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    do: jax.Array,
    g1: jax.Array,
    g2: jax.Array,
    hs: jax.Array,
    dl: jax.Array,
    e: jax.Array,
    ds_end: jax.Array,
    dqi: jax.Array,
    dki: jax.Array,
    bl: jax.Array,
    flags: jax.Array,
    *,
    scale: float,
    P: int,
    chunk: int = 64,
    thresh: float = THRESH,
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
    """dq, dk, dg1, dg2 and the mix gradient's pieces of every chunk in parallel, two warpgroups per program.

    Args and products: as `pallas_gpu_bwd_mgpu.dqk_mgpu` with `flags` (the intra-chunk terms computed in the kernel;
    dqi, dki hold the exact path's terms, read on the flagged programs only) and kv_f32 False.

    Returns:
        dq [B, T, H, K] (q's dtype), dk, dg1, dg2 [B, T, H, K] (k's / g's dtype) and the mix gradient's pieces
        [2, B * H, N, 2 (K / 64) * BT] float32 (dw_s is their sum).
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    B, T, H, K = q.shape
    V = v.shape[-1]
    BT, BV, BK = chunk, 64, HALF
    _check("paired dq / dk kernel", BT, BV, K, T, P, v)
    _check_sixteen("paired dq / dk kernel", q=q, k=k, g1=g1, g2=g2, do=do)
    problem = dqk_pair_problem(K, V, g1.dtype, False)
    if problem is not None:
        raise ValueError(f"the Mosaic GPU paired dq / dk kernel needs {problem}")
    N = T // BT
    NC, nv, nk = N // P, V // BV, K // 64
    if flags.shape != (2 * nk, B * H, N):
        raise ValueError(f"flags must be [2 * K / 64, B * H, N] = {(2 * nk, B * H, N)}, got {flags.shape}")
    acc = plgpu.Layout.WGMMA
    sw32, _ = swizzles()
    sw64 = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(64))  # 16-bit tiles, 32-column rows
    ld, mma = kernel_ops(interpret)
    wv = jnp.broadcast_to(w.astype(f32)[:, None], (2, K))
    lim = 0.5 * thresh
    FP = -(-2 * nk // 32) * 32  # a chunk's flags row, padded to 128 bytes (a Lane-semantics copy's multiple)
    # TMA barriers, each used once (a group holds at most 32): shared, do tiles 0.., v tiles nv.. (copied by
    # warpgroup 0, waited for by both); warpgroup w's own group: q 0, k 1, g 2, e 3, w 4, bL 5, flags 6, dqi 7, dki 8,
    # state tiles of value tile j 9 + 3 j + 0..2.
    PER = 9 + 3 * nv

    def body(w_ref, q_ref, k_ref, v_ref, do_ref, g1_ref, g2_ref, hs_ref, dl_ref, e_ref, de_ref, dqi_ref, dki_ref,
             bl_ref, fl_ref, dq_ref, dk_ref, dg1_ref, dg2_ref, dw_ref, *scratch):  # fmt: skip
        (do_sm, v_sm, tri_sm, da_sm, q_sm, k_sm, g_sm, e_sm, w_sm, bl_sm, fl_sm, st_sm, hl_sm, iq_sm, dw_sm, dg_sm,
         shared_bar, bar0, bar1, ready) = scratch  # fmt: skip
        sk, bh, c = lax.axis_index("sk"), lax.axis_index("bh"), lax.axis_index("c")
        s, ik = lax.div(sk, nk), lax.rem(sk, nk)
        b, h, p = lax.div(bh, H), lax.rem(bh, H), lax.div(c, NC)
        ts = pl.ds(c * BT, BT)
        cp = plgpu.copy_gmem_to_smem

        def thread(wg: int) -> None:
            ks = pl.ds(ik * 64 + wg * BK, BK)
            bar, o = (bar0, bar1)[wg], 0  # this warpgroup's barriers
            hl = hl_sm.at[wg]

            def fetch_states(j):  # value tile j: H_c, Dloc, dS_end of state s, this warpgroup's key rows
                vs = pl.ds(j * BV, BV)
                cp(hs_ref.at[s, bh, c, ks, vs], st_sm.at[wg, 0], bar.at[o + 9 + 3 * j])
                cp(dl_ref.at[s, bh, c, ks, vs], st_sm.at[wg, 1], bar.at[o + 10 + 3 * j])
                cp(de_ref.at[bh, p, s, ks, vs], st_sm.at[wg, 2], bar.at[o + 11 + 3 * j])

            if wg == 0:
                for j in range(nv):
                    cp(do_ref.at[b, ts, h, pl.ds(j * BV, BV)], do_sm.at[j], shared_bar.at[j])
                    cp(v_ref.at[b, ts, h, pl.ds(j * BV, BV)], v_sm.at[j], shared_bar.at[nv + j])
            cp(q_ref.at[b, ts, h, ks], q_sm.at[wg], bar.at[o])
            cp(k_ref.at[b, ts, h, ks], k_sm.at[wg], bar.at[o + 1])
            _fetch_gate(g1_ref, g2_ref, s, (b, ts, h, ks), g_sm.at[wg], bar.at[o + 2])
            cp(e_ref.at[s, bh, c, ks], e_sm.at[wg], bar.at[o + 3])
            cp(w_ref.at[s, ks], w_sm.at[wg], bar.at[o + 4])
            cp(bl_ref.at[s, bh, c, ks], bl_sm.at[wg], bar.at[o + 5])
            cp(fl_ref.at[bh, c], fl_sm.at[wg], bar.at[o + 6])
            fetch_states(0)
            _wait(shared_bar, 0, 2 * nv)  # do, v
            if wg == 0:  # the 0 / 1 matrices [t, i] (1 where i >= t; where i < t) and dA's halves, for both
                d = row_minus_col(BT, acc, interpret)
                tri_sm.at[0][...] = jnp.clip(1.0 - d, 0.0, 1.0).astype(bf16)
                tri_sm.at[1][...] = jnp.clip(d, 0.0, 1.0).astype(bf16)
                _intra_scores(mma, interpret, d, do_sm, v_sm, da_sm)
                plgpu.commit_smem()
                plgpu.barrier_arrive(ready.at[0])
            f = lambda ref: ld(ref, acc).astype(f32)  # noqa: E731
            dvd = sum(jnp.sum(f(do_sm.at[j]) * f(v_sm.at[j]), axis=1) for j in range(nv))  # do_t . v_t, [BT]

            def rows(x):  # [BT] per token -> [BT, BK]
                return lax.broadcast_in_dim(x, (BT, BK), [0])

            def cols(ref, n=BT):  # a [BK] shared-memory vector -> [n, BK]
                return lax.broadcast_in_dim(ld(ref, acc.reduce(0)), (n, BK), [1])

            _wait(bar, o + 2, 1)  # g
            _wait(bar, o + 3, 3)  # e, w, bL
            plgpu.barrier_wait(ready.at[0])
            iq = (iq_sm.at[wg, 0], iq_sm.at[wg, 1])
            _intra_products(ld, mma, interpret, g_sm=g_sm.at[wg], cum_t=tri_sm.at[0], bl_sm=bl_sm.at[wg],
                            q_sm=q_sm.at[wg], k_sm=k_sm.at[wg], da_sm=da_sm, qe=(hl.at[0], hl.at[1]),
                            ke=(hl.at[2], hl.at[3]), out=iq, lim=lim, wait_qk=lambda: _wait(bar, o, 2))  # fmt: skip
            _wait(bar, o + 6, 1)  # (the last commit is also a warpgroup barrier: a flagged tile's copies come next)

            @pl.when(fl_sm.at[wg][sk] > 0.5)
            def _():  # the exact path's terms for this tile
                cp(dqi_ref.at[s, bh, ts, ks], iq[0], bar.at[o + 7])
                cp(dki_ref.at[s, bh, ts, ks], iq[1], bar.at[o + 8])
                _wait(bar, o + 7, 2)

            dqh = vds = zeros((BT, BK), acc, interpret)
            hd = None  # H_c^T * D^T, summed over the value tiles
            ec = cols(e_sm.at[wg], BV)
            for j in range(nv):
                _wait(bar, o + 9 + 3 * j, 3)
                ht = load_transposed(st_sm.at[wg, 0], interpret)  # H_c^T [BV, BK]
                dt = load_transposed(st_sm.at[wg, 1], interpret) + ec * load_transposed(st_sm.at[wg, 2], interpret)
                hd = ht * dt if hd is None else hd + ht * dt
                split_halves(ht, hl.at[0], hl.at[1])
                split_halves(dt, hl.at[2], hl.at[3])
                plgpu.commit_smem()  # also a warpgroup barrier: st_sm is read
                if j + 1 < nv:
                    fetch_states(j + 1)
                dqh = mma(dqh, [(do_sm.at[j], hl.at[0]), (do_sm.at[j], hl.at[1])])
                vds = mma(vds, [(v_sm.at[j], hl.at[2]), (v_sm.at[j], hl.at[3])])
            hd = hd * jnp.exp(cols(bl_sm.at[wg], BV))  # the boundary term's summands exp(bL) H_c^T * D^T
            bg = _gate_cumsum(mma, interpret, tri_sm.at[0], g_sm.at[wg])
            ws = cols(w_sm.at[wg])
            x = vds * jnp.exp(jnp.minimum(cols(bl_sm.at[wg]) - bg, 0.0))  # dk_s's state term
            dq_s = scale * (dqh * jnp.exp(bg) + ld(iq[0], acc))
            kf = f(k_sm.at[wg])
            split_halves(kf * x + hd, hl.at[2], hl.at[3])
            dki_w = (scale * ws) * ld(iq[1], acc)
            qf = f(q_sm.at[wg])
            split_halves(ws * qf * dq_s - kf * dki_w + hd, hl.at[0], hl.at[1])
            sd = scale * rows(dvd)
            dq_full = dq_s + sd * kf
            dw_sm.at[wg][...] = jnp.sum(qf * dq_full, axis=1)  # per token (within a warp); the caller sums all
            iq[0][...] = ws * dq_full  # this state's dq and dk shares, float32, through the intra terms' tiles
            iq[1][...] = x + dki_w + ws * sd * qf
            plgpu.commit_smem()  # the halves and shares are written
            plgpu.copy_smem_to_gmem(iq[0], dq_ref.at[s, b, ts, h, ks])
            plgpu.copy_smem_to_gmem(iq[1], dk_ref.at[s, b, ts, h, ks])
            plgpu.copy_smem_to_gmem(dw_sm.at[wg], dw_ref.at[s, bh, c, pl.ds((2 * ik + wg) * BT, BT)])
            up, lo = tri_sm.at[0], tri_sm.at[1]
            dg = mma(zeros((BT, BK), acc, interpret), [(up, hl.at[0]), (up, hl.at[1]), (lo, hl.at[2]), (lo, hl.at[3])])
            dg_sm.at[wg][...] = dg.astype(dg_sm.dtype)
            plgpu.commit_smem()
            for i, dg_ref in enumerate((dg1_ref, dg2_ref)):  # one output per gate: no slices (copies) in XLA after

                @pl.when(s == i)
                def _(dg_ref=dg_ref):
                    plgpu.copy_smem_to_gmem(dg_sm.at[wg], dg_ref.at[b, ts, h, ks])

            plgpu.wait_smem_to_gmem(0)

        per_warpgroup(thread)

    kernel = launch_pair(
        body,
        name="dsla_dqk_pair_mgpu",
        interpret=interpret,
        out_type=(
            jax.ShapeDtypeStruct((2, B, T, H, K), f32),
            jax.ShapeDtypeStruct((2, B, T, H, K), f32),
            jax.ShapeDtypeStruct((B, T, H, K), g1.dtype),
            jax.ShapeDtypeStruct((B, T, H, K), g1.dtype),
            jax.ShapeDtypeStruct((2, B * H, N, 2 * nk * BT), f32),
        ),
        grid=(2 * nk, B * H, N),
        grid_names=("sk", "bh", "c"),
        scratch_types=[
            plgpu.SMEM((nv, BT, BV), do.dtype, transforms=sw64),  # shared
            plgpu.SMEM((nv, BT, BV), v.dtype, transforms=sw64),  # shared
            plgpu.SMEM((2, BT, BT), bf16, transforms=sw64),  # the 0 / 1 matrices, shared
            plgpu.SMEM((2, BT, BT), bf16, transforms=sw64),  # dA halves, shared
            plgpu.SMEM((2, BT, BK), q.dtype, transforms=sw64),  # per warpgroup from here
            plgpu.SMEM((2, BT, BK), k.dtype, transforms=sw64),
            plgpu.SMEM((2, BT, BK), g1.dtype, transforms=sw64),
            plgpu.SMEM((2, BK), f32),  # e
            plgpu.SMEM((2, BK), f32),  # w
            plgpu.SMEM((2, BK), f32),  # bL
            plgpu.SMEM((2, FP), f32),  # flags
            plgpu.SMEM((2, 3, BK, BV), f32, transforms=sw32),  # H_c, Dloc, dS_end tiles
            plgpu.SMEM((2, 4, BT, BK), bf16, transforms=sw64),  # q, k halves; H_c^T, D^T halves; dg's summands
            plgpu.SMEM((2, 2, BT, BK), f32, transforms=sw32),  # dqi, dki; then the dq, dk shares
            plgpu.SMEM((2, BT), f32),  # dw
            plgpu.SMEM((2, BT, BK), g1.dtype, transforms=sw64),  # dg
            plgpu.Barrier(num_barriers=2 * nv),
            plgpu.Barrier(num_barriers=PER),
            plgpu.Barrier(num_barriers=PER),
            plgpu.Barrier(num_arrivals=1, num_barriers=1),  # the 0 / 1 matrices and dA's halves written
        ],
    )
    fl = jnp.moveaxis(flags.astype(f32), 0, -1)  # [B * H, N, FP]: a chunk's flags in one row
    fl = jnp.pad(fl, ((0, 0), (0, 0), (0, FP - 2 * nk)))
    dqp, dkp, dg1, dg2, dw = kernel(wv, q, k, v, do, g1, g2, hs, dl, e, ds_end, dqi, dki, bl, fl)
    return (dqp[0] + dqp[1]).astype(q.dtype), (dkp[0] + dkp[1]).astype(k.dtype), dg1, dg2, dw
