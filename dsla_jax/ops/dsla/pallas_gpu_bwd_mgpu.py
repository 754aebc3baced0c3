"""Mosaic GPU kernels for the DSLA split backward's gradients, every chunk in parallel (`GpuConfig.bwd_dv_mosaic`,
`bwd_dqk_mosaic`, `bwd_intra_mosaic`; used where the forward ran the Mosaic GPU kernels, `GpuConfig(rec="mosaic")`):
`dv_mgpu` (twin `pallas_gpu_bwd._dv_kernel`), `dqk_mgpu` (twin `pallas_gpu_bwd._dqk_kernel` with grads_order
"split") and `dqk_intra_mgpu` (twin of `pallas_gpu_bwd._dqk_intra_kernel`'s fast path). By default the dq / dk
kernel computes the intra-chunk terms itself (`GpuConfig.bwd_intra_fused`, v13) and `dqk_intra_mgpu` does not run.
One warpgroup per program, TMA copies, WGMMA on bfloat16 operands: float32 tiles that a product reads transposed
(tf32 WGMMA reads both operands K-major only) are split in the kernel into bfloat16 halves, hi + lo, exact to
~2^-16. Measured against the twins in `docs/benchmarks.md` (v10; dq / dk and the intra-chunk terms v12, v13).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dsla_jax.ops.dsla.mgpu import kernel_ops, launch, row_minus_col, split_halves, swizzle_for, swizzles, zeros
from dsla_jax.ops.dsla.pallas_gpu import THRESH
from dsla_jax.ops.dsla.pallas_gpu_rec_mgpu import _check, _wait

f32 = jnp.float32
bf16 = jnp.bfloat16


def _check_sixteen(what: str, **arrays: jax.Array) -> None:
    """Raise a clear error unless every array is 16-bit and the gates g1, g2 share one dtype."""
    for name, x in arrays.items():
        if jnp.dtype(x.dtype).itemsize != 2:
            raise ValueError(f"the Mosaic GPU {what} needs 16-bit inputs, got {name} {x.dtype}")
    if arrays["g1"].dtype != arrays["g2"].dtype:
        raise ValueError(f"the Mosaic GPU {what} needs both gates in one dtype, got {arrays['g1'].dtype}, "
                         f"{arrays['g2'].dtype}")  # fmt: skip


def _fetch_gate(g1_ref, g2_ref, s, idx: tuple, dst, barrier) -> None:
    """TMA copy of state s's gate tile, g_s.at[idx], into dst (s traced, 0 or 1: one copy of the two runs)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    for i, g_ref in enumerate((g1_ref, g2_ref)):

        @pl.when(s == i)
        def _(g_ref=g_ref):
            plgpu.copy_gmem_to_smem(g_ref.at[idx], dst, barrier)


def _gate_cumsum(mma, interpret: bool, cum_t, g_sm) -> jax.Array:
    """b = the inclusive cumsum of a gate tile over its rows, [BT, BK] float32: one bf16 WGMMA with the 0 / 1 matrix
    cum_t read transposed (exact for bfloat16 gates)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return mma(zeros(g_sm.shape, plgpu.Layout.WGMMA, interpret), [(("T", cum_t), g_sm)])


def _intra_terms(
    ld,
    mma,
    interpret: bool,
    d,
    *,
    do_sm,
    v_sm,
    g_sm,
    cum_t,
    bl_sm,
    q_sm,
    k_sm,
    da_sm,
    qe,
    ke,
    out,
    lim: float,
    wait_gates,
    wait_qk,
) -> None:
    """The intra-chunk dq / dk terms of one state and key tile by the fast path, into `out` (two [BT, BK] float32
    refs: dqi, dki), shared by `dqk_intra_mgpu` and the fused `dqk_mgpu`: dA = do v^T (do_sm, v_sm: [nv, BT, BV],
    arrived), masked to j < i with d = i - j (`row_minus_col`) and split into da_sm's halves; b the inclusive gate
    cumsum (cum_t: the 0 / 1 matrix read transposed); the decayed q, k split into qe, ke (hi, lo refs); three bf16
    WGMMAs per product. wait_gates / wait_qk wait for the gate tile and bL / q and k. Ends with the outputs
    committed."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    acc = plgpu.Layout.WGMMA
    BT, BK = g_sm.shape
    da = mma(zeros((BT, BT), acc, interpret), [(do_sm.at[j], ("T", v_sm.at[j])) for j in range(do_sm.shape[0])])
    split_halves(da * jnp.clip(d, 0.0, 1.0), da_sm.at[0], da_sm.at[1])  # dA masked to j < i
    wait_gates()
    plgpu.commit_smem()  # the 0 / 1 matrix and da_sm are written
    bg = _gate_cumsum(mma, interpret, cum_t, g_sm)
    m = 0.5 * lax.broadcast_in_dim(ld(bl_sm, acc.reduce(0)), (BT, BK), [1])
    dd = jnp.minimum(jnp.maximum(bg - m, -lim), lim)
    ef, ei = jnp.exp(dd), jnp.exp(-dd)
    wait_qk()
    split_halves(ld(q_sm, acc).astype(f32) * ef, *qe)
    split_halves(ld(k_sm, acc).astype(f32) * ei, *ke)
    plgpu.commit_smem()  # the halves are written
    z = zeros((BT, BK), acc, interpret)
    hi, lo = da_sm.at[0], da_sm.at[1]
    out[0][...] = ef * mma(z, [(hi, ke[0]), (hi, ke[1]), (lo, ke[0])])
    out[1][...] = ei * mma(z, [(("T", hi), qe[0]), (("T", hi), qe[1]), (("T", lo), qe[0])])
    plgpu.commit_smem()


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
        split_halves(ld(a_sm, acc), ah_sm, al_sm)
        dv = zeros((BT, BV), acc, interpret)
        _wait(bar, 1, 2)
        for s in range(2):
            _wait(bar, 5 if s == 0 else 9, 2)  # the state's adjoint tiles
            ec = lax.broadcast_in_dim(ld(e_sm.at[s], acc.reduce(1)), (K, BV), [0])
            split_halves(ld(dl_sm, acc) + ec * ld(de_sm, acc), dh_sm, dlo_sm)  # D_s [K, BV]
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
            plgpu.SMEM((BT, BV), out_dtype, transforms=swizzle_for(out_dtype)),
            plgpu.Barrier(num_barriers=11),
        ],
    )
    return kernel(kd, dl, e, ds_end, a, do)


def dqk_mgpu(
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
    *,
    scale: float,
    P: int,
    chunk: int = 64,
    kv_f32: bool = False,
    flags: jax.Array | None = None,
    thresh: float = THRESH,
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
    """dq, dk, dg1, dg2 and the mix gradient's pieces of every chunk in parallel (the split backward's dq / dk
    kernel, twin `pallas_gpu_bwd._dqk_kernel` with grads_order "split": the intra-chunk terms dqi, dki come from
    `_dqk_intra_kernel`). The default where the forward ran the Mosaic GPU kernels (`GpuConfig.bwd_dqk_mosaic`):
    on an H200 at B1 T8192 H32 D128 bf16 the kernel takes 1.23 ms against the twin's 2.39, forward + backward 5.06
    against 5.98 ms in the same call, with finer gradients (dq / dg1 errors against XLA 7.7e-5 / 4.7e-4 against
    5.8e-4 / 6.8e-4) (v12, call 1).

    Per program (state s x 64-key tile, batch x head, chunk c), with w_s the mix weight, b the chunk-local
    inclusive gate cumsum, bL its last row, H_c the state entering the chunk and D = Dloc + diag(e) dS_end the
    adjoint of the state leaving it:

        dq_s = scale (exp(b) * (do H_c^T) + dqi_s)          dk_s = x_s + w_s scale dki_s,  x_s = exp(bL - b) * (v D^T)
        dg_s,t = sum_{i >= t} (w_s q dq_s - w_s scale k dki_s)_i + sum_{i < t} (k x_s)_i + exp(bL) sum_V H_c * D
        dq = sum_s w_s (dq_s + scale (do . v) k)           dk = sum_s (dk_s + w_s scale (do . v) q)

    The gate gradient is the textbook reverse cumsum of w_s q dq_s - k dk_s plus the boundary term sum_V H_{c+1} * D
    = exp(bL) sum_V H_c * D + sum_i (k x_s)_i, rearranged so that the reverse cumsum's -k x_s and the boundary's
    +k x_s cancel in exact arithmetic instead of in rounding: for strongly decaying gates both are O(1) near the
    chunk's end while dg is tiny (a form that read sum_V H_{c+1} * D from the state pass missed the bar by that
    cancellation: dg1 6.1e-3 on an H200, v10 call 6).

    One state per program: a program carries one state's tiles only (the state and key tile are the grid's fastest
    axis, so a chunk's four programs share its q, k, v, do in L2). Each program writes its state's share of dq and
    dk as float32 partials [2, B, T, H, K], summed by XLA and rounded once; dg_s and dw_s are its own. (Both states
    in one program carried state 0's dq and dk across state 1's loop: 255 registers with 1-4 GB of spill traffic,
    2.4-4.6 ms for the kernel, forward + backward 6.43 ms in v12 call 1; this form also sits at 255 registers, with
    no spills, 202 KB of shared memory.)

    With `flags` (`GpuConfig.bwd_intra_fused`) the kernel computes the intra-chunk terms itself, by
    `dqk_intra_mgpu`'s fast path (the same products in the same order), before its state loop, while the state
    tiles' copies fly: their float32 round trip through global memory (0.54 GB at B1 T8192 H32 D128) and a launch go.
    dqi, dki then hold the exact path's terms on the flagged (state, key tile, chunk) programs only
    (`pallas_gpu_bwd.intra_terms_fixup_gpu` without prior terms; elsewhere never read), and a flagged program copies
    its tile of them over its fast-path terms.

    The state tiles come in [64, 64] float32 pieces (H_c, Dloc, dS_end), are combined in registers, and H_c and D
    are split into bfloat16 halves for the products with do and v (bf16 WGMMAs reading them transposed). The gate
    cumsum and both triangular sums are bf16 WGMMAs with two 0 / 1 matrices built once in shared memory (the
    cumsum's lower triangle is the upper one read transposed; exact for 16-bit gates, the summed terms in halves);
    every sum over tokens is a WGMMA or a per-token sum within a warp; bL comes from XLA. Every exponent is <= 0.

    Args:
        w: [2] float32 mix; q, k, g1, g2: [B, T, H, K] 16-bit; v, do: [B, T, H, V] 16-bit; hs, dl: [2, B * H, N, K,
            V] float32 states entering / segment-local adjoints leaving every chunk; e: [2, B * H, N, K] float32
            decays to the segment end; ds_end: [B * H, P, 2, K, V] float32; dqi, dki: [2, B * H, T, K] float32
            intra-chunk terms (with `flags`: valid on the flagged programs only); bl: [2, B * H, N, K] float32
            per-chunk gate sums (`chunk_gate_sums`).
        kv_f32: dk, dg1, dg2 in float32 (grouped heads: summed per kv head by the caller).
        flags: None (dqi, dki are every program's terms) or [2 * K / 64, B * H, N] float32 (`pallas_gpu_bwd.
            intra_flags` at 64-key tiles): compute the intra-chunk terms in the kernel, thresh being the fast path's
            decay range bound, and take dqi, dki's tiles where the flag is 1.

    Returns:
        dq [B, T, H, K] (q's dtype), dk, dg1, dg2 [B, T, H, K] (float32 with kv_f32, else k's / g's dtype) and the
        mix gradient's pieces [2, B * H, N, (K / 64) * BT] float32 (dw_s is their sum).
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    B, T, H, K = q.shape
    V = v.shape[-1]
    BT, BK, BV = chunk, 64, 64
    _check("dq / dk kernel", BT, BV, K, T, P, v)
    _check_sixteen("dq / dk kernel", q=q, k=k, g1=g1, g2=g2, do=do)
    N = T // BT
    NC, nv, nk = N // P, V // BV, K // BK
    acc = plgpu.Layout.WGMMA
    sw32, sw16 = swizzles()
    ld, mma = kernel_ops(interpret)
    wv = jnp.broadcast_to(w.astype(f32)[:, None], (2, K))
    dg_dt = f32 if kv_f32 else g1.dtype
    fused = flags is not None
    lim = 0.5 * thresh
    if fused and flags.shape != (2 * nk, B * H, N):
        raise ValueError(f"flags must be [2 * K / 64, B * H, N] = {(2 * nk, B * H, N)}, got {flags.shape}")
    # Barriers, each used once: q 0, k 1, g 2, do tiles 3.., v tiles 3 + nv.., e F, w F + 1, bL F + 2, dqi / dki
    # F + 3, F + 4 (fused: only on flagged programs), the flags F + 5, state tiles j on ST + 3 j + 0..2.
    F = 3 + 2 * nv
    ST = F + 6
    FP = -(-2 * nk // 32) * 32  # a chunk's flags row, padded to 128 bytes (a Lane-semantics copy's multiple)

    def body(w_ref, q_ref, k_ref, v_ref, do_ref, g1_ref, g2_ref, hs_ref, dl_ref, e_ref, de_ref, dqi_ref, dki_ref,
             bl_ref, *refs):  # fmt: skip
        fl_ref, refs = (refs[0], refs[1:]) if fused else (None, refs)
        dq_ref, dk_ref, dg1_ref, dg2_ref, dw_ref, *scratch = refs
        (q_sm, k_sm, g_sm, do_sm, v_sm, e_sm, w_sm, bl_sm, st_sm, hl_sm, tri_sm, iq_sm, vec_sm, dw_sm, *opt_sm,
         bar) = scratch  # fmt: skip
        dg_sm = st_sm.at[2] if dg_dt == f32 else opt_sm.pop(0)  # float32 dg leaves through a free state tile
        sk, bh, c = lax.axis_index("sk"), lax.axis_index("bh"), lax.axis_index("c")
        s, ik = lax.div(sk, nk), lax.rem(sk, nk)
        b, h, p = lax.div(bh, H), lax.rem(bh, H), lax.div(c, NC)
        ts, ks = pl.ds(c * BT, BT), pl.ds(ik * BK, BK)
        cp = plgpu.copy_gmem_to_smem

        def fetch_states(j):  # value tile j: H_c, Dloc, dS_end of state s
            vs = pl.ds(j * BV, BV)
            cp(hs_ref.at[s, bh, c, ks, vs], st_sm.at[0], bar.at[ST + 3 * j])
            cp(dl_ref.at[s, bh, c, ks, vs], st_sm.at[1], bar.at[ST + 3 * j + 1])
            cp(de_ref.at[bh, p, s, ks, vs], st_sm.at[2], bar.at[ST + 3 * j + 2])

        def fetch_intra():  # this program's tiles of dqi, dki into iq_sm
            cp(dqi_ref.at[s, bh, ts, ks], iq_sm.at[0], bar.at[F + 3])
            cp(dki_ref.at[s, bh, ts, ks], iq_sm.at[1], bar.at[F + 4])

        cp(q_ref.at[b, ts, h, ks], q_sm, bar.at[0])
        cp(k_ref.at[b, ts, h, ks], k_sm, bar.at[1])
        _fetch_gate(g1_ref, g2_ref, s, (b, ts, h, ks), g_sm, bar.at[2])

        for j in range(nv):
            cp(do_ref.at[b, ts, h, pl.ds(j * BV, BV)], do_sm.at[j], bar.at[3 + j])
            cp(v_ref.at[b, ts, h, pl.ds(j * BV, BV)], v_sm.at[j], bar.at[3 + nv + j])
        cp(e_ref.at[s, bh, c, ks], e_sm, bar.at[F])
        cp(w_ref.at[s, ks], w_sm, bar.at[F + 1])
        cp(bl_ref.at[s, bh, c, ks], bl_sm, bar.at[F + 2])
        if fused:
            cp(fl_ref.at[bh, c], opt_sm[-1], bar.at[F + 5])
        else:
            fetch_intra()
        fetch_states(0)
        # The 0 / 1 matrices [t, i], built while the copies fly: 1 where i >= t (the cumsum's i <= t: transposed)
        # and where i < t.
        d = row_minus_col(BT, acc, interpret)
        tri_sm.at[0][...] = jnp.clip(1.0 - d, 0.0, 1.0).astype(bf16)
        tri_sm.at[1][...] = jnp.clip(d, 0.0, 1.0).astype(bf16)
        _wait(bar, 3, 2 * nv + 3)  # do, v, e, w, bL
        f = lambda ref: ld(ref, acc).astype(f32)  # noqa: E731
        dvd = sum(jnp.sum(f(do_sm.at[j]) * f(v_sm.at[j]), axis=1) for j in range(nv))  # do_t . v_t, [BT]

        def rows(x):  # [BT] per token -> [BT, BK]
            return lax.broadcast_in_dim(x, (BT, BK), [0])

        def cols(ref):  # a [BK] shared-memory vector -> [BT, BK]
            return lax.broadcast_in_dim(ld(ref, acc.reduce(0)), (BT, BK), [1])

        if fused:  # the intra-chunk terms by `dqk_intra_mgpu`'s fast path, into iq_sm, while the states fly
            da_sm, fl_sm = opt_sm
            _intra_terms(ld, mma, interpret, d, do_sm=do_sm, v_sm=v_sm, g_sm=g_sm, cum_t=tri_sm.at[0], bl_sm=bl_sm,
                         q_sm=q_sm, k_sm=k_sm, da_sm=da_sm, qe=(hl_sm.at[0], hl_sm.at[1]),  # (free until the
                         ke=(hl_sm.at[2], hl_sm.at[3]), out=(iq_sm.at[0], iq_sm.at[1]), lim=lim,  # state loop)
                         wait_gates=lambda: _wait(bar, 2, 1), wait_qk=lambda: _wait(bar, 0, 2))  # fmt: skip
            # (the last commit is also a warpgroup barrier: a flagged program's copies overwrite iq_sm next)
            _wait(bar, F + 5, 1)

            @pl.when(fl_sm[sk] > 0.5)
            def _():  # the exact path's terms for this tile
                fetch_intra()
                _wait(bar, F + 3, 2)

        dqh = vds = zeros((BT, BK), acc, interpret)
        hsum = None
        ec = lax.broadcast_in_dim(ld(e_sm, acc.reduce(1)), (BK, BV), [0])
        for j in range(nv):
            _wait(bar, ST + 3 * j, 3)
            hc = ld(st_sm.at[0], acc)
            dst = ld(st_sm.at[1], acc) + ec * ld(st_sm.at[2], acc)  # D [BK, BV]
            part = jnp.sum(hc * dst, axis=1)  # sum_V H_c * D, per key channel (within a warp)
            hsum = part if hsum is None else hsum + part
            split_halves(hc, hl_sm.at[0], hl_sm.at[1])
            split_halves(dst, hl_sm.at[2], hl_sm.at[3])
            plgpu.commit_smem()  # also a warpgroup barrier: st_sm is read
            if j + 1 < nv:
                fetch_states(j + 1)
            dqh = mma(dqh, [(do_sm.at[j], ("T", hl_sm.at[0])), (do_sm.at[j], ("T", hl_sm.at[1]))])
            vds = mma(vds, [(v_sm.at[j], ("T", hl_sm.at[2])), (v_sm.at[j], ("T", hl_sm.at[3]))])
        vec_sm[...] = hsum * jnp.exp(ld(bl_sm, acc.reduce(1)))  # the boundary term, per key channel: as columns
        if not fused:  # (fused: these have arrived)
            _wait(bar, 2, 1)
        # (fused: the intra terms took this cumsum too; it is recomputed here, one WGMMA, rather than held live
        # across the state loop in 32 more registers of a kernel at 255: a choice, not measured apart)
        bg = _gate_cumsum(mma, interpret, tri_sm.at[0], g_sm)
        if not fused:
            _wait(bar, 0, 2)  # q, k
            _wait(bar, F + 3, 2)  # dqi, dki
        plgpu.commit_smem()  # vec_sm is written
        ws = cols(w_sm)
        x = vds * jnp.exp(jnp.minimum(cols(bl_sm) - bg, 0.0))  # dk_s's state term
        dq_s = scale * (dqh * jnp.exp(bg) + ld(iq_sm.at[0], acc))
        kf = f(k_sm)
        split_halves(kf * x, hl_sm.at[2], hl_sm.at[3])
        dki_w = (scale * ws) * ld(iq_sm.at[1], acc)
        qf = f(q_sm)
        split_halves(ws * qf * dq_s - kf * dki_w, hl_sm.at[0], hl_sm.at[1])
        sd = scale * rows(dvd)
        dq_full = dq_s + sd * kf
        dw_sm[...] = jnp.sum(qf * dq_full, axis=1)  # per token (within a warp); the caller sums everything
        st_sm.at[0][...] = ws * dq_full  # this state's dq and dk shares, float32, in the free state buffers
        st_sm.at[1][...] = x + dki_w + ws * sd * qf
        plgpu.commit_smem()  # the halves and shares are written; iq_sm, st_sm are read
        plgpu.copy_smem_to_gmem(st_sm.at[0], dq_ref.at[s, b, ts, h, ks])
        plgpu.copy_smem_to_gmem(st_sm.at[1], dk_ref.at[s, b, ts, h, ks])
        plgpu.copy_smem_to_gmem(dw_sm, dw_ref.at[s, bh, c, pl.ds(ik * BT, BT)])
        up, lo = tri_sm.at[0], tri_sm.at[1]
        dg = mma(cols(vec_sm), [(up, hl_sm.at[0]), (up, hl_sm.at[1]), (lo, hl_sm.at[2]), (lo, hl_sm.at[3])])
        dg_sm[...] = dg.astype(dg_sm.dtype)
        plgpu.commit_smem()
        for i, dg_ref in enumerate((dg1_ref, dg2_ref)):  # one output per gate: no slices (copies) in XLA after

            @pl.when(s == i)
            def _(dg_ref=dg_ref):
                plgpu.copy_smem_to_gmem(dg_sm, dg_ref.at[b, ts, h, ks])

        plgpu.wait_smem_to_gmem(0)

    kernel = launch(
        body,
        name="dsla_dqk_mgpu",
        interpret=interpret,
        reduction_scratch_bytes=0,  # every reduction stays within a warp
        out_type=(
            jax.ShapeDtypeStruct((2, B, T, H, K), f32),
            jax.ShapeDtypeStruct((2, B, T, H, K), f32),
            jax.ShapeDtypeStruct((B, T, H, K), dg_dt),
            jax.ShapeDtypeStruct((B, T, H, K), dg_dt),
            jax.ShapeDtypeStruct((2, B * H, N, nk * BT), f32),
        ),
        grid=(2 * nk, B * H, N),
        grid_names=("sk", "bh", "c"),
        scratch_types=[
            plgpu.SMEM((BT, BK), q.dtype, transforms=sw16),
            plgpu.SMEM((BT, BK), k.dtype, transforms=sw16),
            plgpu.SMEM((BT, BK), g1.dtype, transforms=sw16),
            plgpu.SMEM((nv, BT, BV), do.dtype, transforms=sw16),
            plgpu.SMEM((nv, BT, BV), v.dtype, transforms=sw16),
            plgpu.SMEM((BK,), f32),  # e
            plgpu.SMEM((BK,), f32),  # w
            plgpu.SMEM((BK,), f32),  # bL
            plgpu.SMEM((3, BK, BV), f32, transforms=sw32),  # H_c, Dloc, dS_end tiles; at the end dq, dk shares
            plgpu.SMEM((4, BK, BV), bf16, transforms=sw16),  # H_c, D halves; later r's and k x's halves
            plgpu.SMEM((2, BT, BT), bf16, transforms=sw16),  # the 0 / 1 matrices
            plgpu.SMEM((2, BT, BK), f32, transforms=sw32),  # dqi_s, dki_s
            plgpu.SMEM((BK,), f32),  # sum_V H_c * D
            plgpu.SMEM((BT,), f32),  # dw
            *([] if dg_dt == f32 else [plgpu.SMEM((BT, BK), dg_dt, transforms=swizzle_for(dg_dt))]),  # dg
            *(
                [plgpu.SMEM((2, BT, BT), bf16, transforms=sw16), plgpu.SMEM((FP,), f32)]  # dA halves, flags
                if fused
                else []
            ),
            plgpu.Barrier(num_barriers=ST + 3 * nv),
        ],
    )
    extra = []
    if fused:  # [B * H, N, FP]: a chunk's flags in one row, read by each of its programs
        fl = jnp.moveaxis(flags.astype(f32), 0, -1)
        extra = [jnp.pad(fl, ((0, 0), (0, 0), (0, FP - 2 * nk)))]
    dqp, dkp, dg1, dg2, dw = kernel(wv, q, k, v, do, g1, g2, hs, dl, e, ds_end, dqi, dki, bl, *extra)
    dk_dt = f32 if kv_f32 else k.dtype
    return (dqp[0] + dqp[1]).astype(q.dtype), (dkp[0] + dkp[1]).astype(dk_dt), dg1, dg2, dw


def dqk_intra_mgpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    do: jax.Array,
    g1: jax.Array,
    g2: jax.Array,
    bl: jax.Array,
    *,
    thresh: float,
    chunk: int = 64,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """The intra-chunk terms of dq and dk of each state on the fast path (twin: `pallas_gpu_bwd._dqk_intra_kernel`
    with exact=False), every chunk in parallel, one state and 64-key tile per program:

        dqi_s,i = exp(d_i) * sum_{j < i} dA_ij (k_j * exp(-d_j))
        dki_s,j = exp(-d_j) * sum_{i > j} dA_ij (q_i * exp(d_i))

    with dA = do v^T, d = clip(b - bL / 2, -thresh / 2, thresh / 2), b the chunk-local inclusive gate cumsum and bL
    its last row: exact where the key tile's decay range max(-bL) is at most `thresh` (the clip is then inactive);
    elsewhere finite and wrong, and redone by the Triton fix-up pass (`pallas_gpu_bwd.intra_terms_fixup_gpu`).

    dA is one bf16 WGMMA per 64-column value tile (exact products, float32 sums); it and the decayed q, k are split
    into bfloat16 halves, so each product is three bf16 WGMMAs (hi hi, hi lo, lo hi: ~2^-16 relative), dA read
    transposed for dki. The gate cumsum is a bf16 WGMMA with a 0 / 1 matrix (exact for 16-bit gates); bL comes
    from XLA.

    Args:
        q, k, g1, g2: [B, T, H, K] 16-bit; v, do: [B, T, H, V] 16-bit; bl: [2, B * H, N, K] float32 per-chunk gate
            sums (`pallas_gpu.chunk_gate_sums`).

    Returns:
        dqi, dki [2, B * H, T, K] float32 (unscaled and unweighted, as the twin's).
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    B, T, H, K = q.shape
    V = v.shape[-1]
    BT, BK, BV = chunk, 64, 64
    _check("intra-chunk dq / dk kernel", BT, BV, K, T, 1, v)
    _check_sixteen("intra-chunk dq / dk kernel", q=q, k=k, g1=g1, g2=g2, do=do, v=v)
    N = T // BT
    nv, nk = V // BV, K // BK
    lim = 0.5 * thresh
    acc = plgpu.Layout.WGMMA
    sw32, sw16 = swizzles()
    ld, mma = kernel_ops(interpret)
    # Barriers, each used once: q 0, k 1, g 2, bL 3, do tiles 4.., v tiles 4 + nv...

    def body(q_ref, k_ref, v_ref, do_ref, g1_ref, g2_ref, bl_ref, dqi_ref, dki_ref, *scratch):
        q_sm, k_sm, g_sm, bl_sm, do_sm, v_sm, tri_sm, da_sm, qe_sm, ke_sm, out_sm, bar = scratch
        sk, bh, c = lax.axis_index("sk"), lax.axis_index("bh"), lax.axis_index("c")
        s, ik = lax.div(sk, nk), lax.rem(sk, nk)
        b, h = lax.div(bh, H), lax.rem(bh, H)
        ts, ks = pl.ds(c * BT, BT), pl.ds(ik * BK, BK)
        cp = plgpu.copy_gmem_to_smem
        for j in range(nv):
            cp(do_ref.at[b, ts, h, pl.ds(j * BV, BV)], do_sm.at[j], bar.at[4 + j])
            cp(v_ref.at[b, ts, h, pl.ds(j * BV, BV)], v_sm.at[j], bar.at[4 + nv + j])
        _fetch_gate(g1_ref, g2_ref, s, (b, ts, h, ks), g_sm, bar.at[2])

        cp(bl_ref.at[s, bh, c, ks], bl_sm, bar.at[3])
        cp(q_ref.at[b, ts, h, ks], q_sm, bar.at[0])
        cp(k_ref.at[b, ts, h, ks], k_sm, bar.at[1])
        d = row_minus_col(BT, acc, interpret)  # i - j
        tri_sm[...] = jnp.clip(1.0 - d, 0.0, 1.0).astype(bf16)  # [t, i]: 1 where i >= t (read transposed: cumsum)
        _wait(bar, 4, 2 * nv)
        _intra_terms(ld, mma, interpret, d, do_sm=do_sm, v_sm=v_sm, g_sm=g_sm, cum_t=tri_sm, bl_sm=bl_sm, q_sm=q_sm,
                     k_sm=k_sm, da_sm=da_sm, qe=(qe_sm.at[0], qe_sm.at[1]), ke=(ke_sm.at[0], ke_sm.at[1]),
                     out=(out_sm.at[0], out_sm.at[1]), lim=lim, wait_gates=lambda: _wait(bar, 2, 2),  # g, bL
                     wait_qk=lambda: _wait(bar, 0, 2))  # fmt: skip
        plgpu.copy_smem_to_gmem(out_sm.at[0], dqi_ref.at[s, bh, ts, ks])
        plgpu.copy_smem_to_gmem(out_sm.at[1], dki_ref.at[s, bh, ts, ks])
        plgpu.wait_smem_to_gmem(0)

    kernel = launch(
        body,
        name="dsla_dqk_intra_mgpu",
        interpret=interpret,
        reduction_scratch_bytes=0,  # no reductions across warps
        out_type=(jax.ShapeDtypeStruct((2, B * H, T, K), f32),) * 2,
        grid=(2 * nk, B * H, N),
        grid_names=("sk", "bh", "c"),
        scratch_types=[
            plgpu.SMEM((BT, BK), q.dtype, transforms=sw16),
            plgpu.SMEM((BT, BK), k.dtype, transforms=sw16),
            plgpu.SMEM((BT, BK), g1.dtype, transforms=sw16),
            plgpu.SMEM((BK,), f32),  # bL
            plgpu.SMEM((nv, BT, BV), do.dtype, transforms=sw16),
            plgpu.SMEM((nv, BT, BV), v.dtype, transforms=sw16),
            plgpu.SMEM((BT, BT), bf16, transforms=sw16),  # the 0 / 1 matrix
            plgpu.SMEM((2, BT, BT), bf16, transforms=sw16),  # dA halves
            plgpu.SMEM((2, BT, BK), bf16, transforms=sw16),  # q exp(d) halves
            plgpu.SMEM((2, BT, BK), bf16, transforms=sw16),  # k exp(-d) halves
            plgpu.SMEM((2, BT, BK), f32, transforms=sw32),  # dqi, dki
            plgpu.Barrier(num_barriers=4 + 2 * nv),
        ],
    )
    return kernel(q, k, v, do, g1, g2, bl)
