"""The fused forward on Mosaic GPU (`GpuConfig.fwd_fused_mosaic`, off by default: slower than the split forward,
kernel_notes item 17): one kernel reads q, k, v, g1, g2 in bfloat16 and
writes only o, every intra- and inter-chunk term computed in its sequential loop, and a segment pass of the same body
without queries or outputs. For the forward that is not differentiated (prefill, inference): the split forward
stays where the backward needs its residuals (decayed q / k, the mixed scores).

Per program (value tile of BV = 64 columns, batch x head, segment) two warpgroups, one per state s, walk the
segment's 64-token chunks. Warpgroup s holds S_s^T [BV, K] float32 as K / 64 WGMMA accumulators [BV, 64] (the key
halves), and per chunk and key half j, with b the chunk-local inclusive cumsum of g_s, bL its last row (from XLA:
`pallas_gpu.chunk_gate_sums`), m = bL / 2 and d = b - m:

    b    = Tri g_s                                bf16 WGMMA with a 0 / 1 lower triangle (exact for bf16 gates)
    kd   = k exp(-d) exp(m) = k exp(bL - b)       bfloat16 halves hi + lo into shared memory
    A_s += x_hi kd_hi^T + x_hi kd_lo^T + x_lo kd_hi^T,   x = w_s q exp(d) exp(-m)   (left operand in registers)
    o_s += qd_hi S_hi + qd_hi S_lo + qd_lo S_hi,          qd = w_s q exp(d) exp(m) = w_s q exp(b)
    S_s^T <- S_s^T diag(exp(bL)) + v^T (kd_hi + kd_lo)

(w_s: the mix weight times the output scale; S_hi, S_lo: the bfloat16 halves of the state entering the chunk, kept
in shared memory by the previous step's update.) Then o_s += A_s v with A_s masked to j <= i, split into bfloat16
halves in registers. Every dropped lo x lo product is ~2^-16 relative. Warpgroup 1 hands o_1 to warpgroup 0 through
a float32 tile in shared memory (two barriers: ready, free), and warpgroup 0 stores o_0 + o_1 by TMA. The factors
exp(+-d) are within exp(+-thresh / 2) only where the chunk's decay range max_K(-bL) <= thresh: the caller runs this
kernel only when no chunk exceeds it (`pallas._gpu_fwd_fused_mosaic` takes the split forward otherwise, through
`lax.cond`), and clamps d so that other chunks stay finite.

Each warpgroup has its own copies of the input tiles (q, k, g_s, v; the second read of q, k, v comes from L2) and
prefetches chunk c + 1's tile as soon as chunk c is done with it: q's once loaded into registers, k's and g_s's
(whose tiles then hold kd's halves) after the key half's update, v's after A_s v. States enter and leave as bfloat16
halves hi + lo of S^T ([BH, P, 2, 2, V, K]: segment, state, half), which is what the output product reads; XLA sums
them (~2^-16 relative).

Shared memory at K = V = 128: per warpgroup q, k, g_s 16 KB each, v 8 KB, the state halves 32 KB, the triangle 8 KB;
the float32 exchange tile 16 KB and o's bfloat16 staging 8 KB: ~217 KB, one program per SM. The segment pass (no q,
no o, no state halves: the k and g tiles stage the final state) takes ~97 KB.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dsla_jax.ops.dsla.mgpu import halves, kernel_ops, launch, row_minus_col, split_halves, swizzles, zeros
from dsla_jax.ops.dsla.pallas_gpu import THRESH
from dsla_jax.ops.dsla.pallas_gpu_intra_mgpu import intra_problem
from dsla_jax.ops.dsla.pallas_gpu_rec_mgpu import _wait

f32 = jnp.float32
bf16 = jnp.bfloat16
TILE = 64  # tokens per chunk (WGMMA rows), key columns per half, value columns per tile


def fused_problem(q: jax.Array, k: jax.Array, v: jax.Array, g1: jax.Array, g2: jax.Array, chunk: int) -> str | None:
    """Why `fwd_fused_mgpu` cannot take these inputs, or None: what the intra kernel needs (`intra_problem`: 64-token
    chunks, dims multiples of 64, T a multiple of the chunk, bfloat16 inputs) and key dim 64 or 128 (a warpgroup holds
    a [64, K] float32 state in registers)."""
    if q.shape[-1] not in (64, 128):
        return f"K in (64, 128) (got K={q.shape[-1]})"
    return intra_problem(q, k, v, g1, g2, chunk)


def split_states(s_t: jax.Array) -> jax.Array:
    """[..., 2, V, K] float32 states (transposed) -> [..., 2, 2, V, K] bfloat16 halves (state, hi / lo)."""
    return jnp.stack(halves(s_t), axis=-3)


def join_states(halves: jax.Array) -> jax.Array:
    """`split_states`' inverse: [..., 2, 2, V, K] bfloat16 -> [..., 2, V, K] float32."""
    return halves[..., 0, :, :].astype(f32) + halves[..., 1, :, :].astype(f32)


def _kernel(
    q, k, v, g1, g2, w, bl, s_in, *, scale: float, P: int, outputs: bool, count: int, thresh: float, interpret: bool
):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    B, T, H, K = k.shape
    V = v.shape[-1]
    problem = fused_problem(k if q is None else q, k, v, g1, g2, TILE)
    if problem is None and T % (P * TILE):
        problem = f"T={T} a multiple of segments x chunk ({P} x {TILE})"
    if problem is not None:
        raise ValueError(f"the Mosaic GPU fused forward needs {problem}")
    BT = BK = BV = TILE
    NC, nk = T // (P * BT), K // BK
    lim = 0.5 * thresh
    acc = plgpu.Layout.WGMMA
    sw32, sw16 = swizzles()
    ld, mma = kernel_ops(interpret)
    wv = jnp.broadcast_to((w.astype(f32) * scale)[:, None], (2, BK))
    # Barriers of warpgroup s start at s * NB, one copy each: q halves +0, k halves +nk, g halves +2 nk, bL halves
    # +3 nk, v +4 nk, w +4 nk + 1, entering state halves (hi, lo of half j at +4 nk + 2 + 2 j + 0 / 1).
    NB = 6 * nk + 2
    QB, KB, GB, LB, VB, WB, SB = 0, nk, 2 * nk, 3 * nk, 4 * nk, 4 * nk + 1, 4 * nk + 2

    def body(*refs):
        if outputs:
            w_ref, q_ref, k_ref, v_ref, g1_ref, g2_ref, bl_ref, sin_ref, o_ref, sout_ref, *scratch = refs
            q_sm, k_sm, g_sm, v_sm, tri_sm, bl_sm, w_sm, sth_sm, stl_sm, x_sm, o_sm, bar, xbar = scratch
        else:
            w_ref, k_ref, v_ref, g1_ref, g2_ref, bl_ref, sout_ref, *scratch = refs
            k_sm, g_sm, v_sm, tri_sm, bl_sm, w_sm, bar = scratch
        wg, iv, bh, p = (lax.axis_index(n) for n in ("wg", "iv", "bh", "p"))
        b, h = lax.div(bh, H), lax.rem(bh, H)
        vs = pl.ds(iv * BV, BV)
        cp = plgpu.copy_gmem_to_smem
        c0 = p * NC

        def cols(x):  # a [64] vector (per key channel) -> [64, 64], constant down the rows
            return lax.broadcast_in_dim(x, (BT, BK), [1])

        def thread(s: int) -> None:
            g_ref = (g1_ref, g2_ref)[s]
            nb = s * NB

            def ts(c):
                return pl.ds(c * BT, BT)

            def ks(j):
                return pl.ds(j * BK, BK)

            def fetch_q(c, j):
                cp(q_ref.at[b, ts(c), h, ks(j)], q_sm.at[s, j], bar.at[nb + QB + j])

            def fetch_kg(c, j):
                cp(k_ref.at[b, ts(c), h, ks(j)], k_sm.at[s, j], bar.at[nb + KB + j])
                cp(g_ref.at[b, ts(c), h, ks(j)], g_sm.at[s, j], bar.at[nb + GB + j])

            def fetch_bl(c, j):
                cp(bl_ref.at[s, bh, c, ks(j)], bl_sm.at[s, j], bar.at[nb + LB + j])

            def fetch_v(c):
                cp(v_ref.at[b, ts(c), h, vs], v_sm.at[s], bar.at[nb + VB])

            cp(w_ref.at[s], w_sm.at[s], bar.at[nb + WB])
            if outputs:
                for j in range(nk):
                    cp(sin_ref.at[bh, p, s, 0, vs, ks(j)], sth_sm.at[s, j], bar.at[nb + SB + 2 * j])
                    cp(sin_ref.at[bh, p, s, 1, vs, ks(j)], stl_sm.at[s, j], bar.at[nb + SB + 2 * j + 1])
            for j in range(nk):
                fetch_bl(c0, j)
                fetch_kg(c0, j)
                if outputs:
                    fetch_q(c0, j)
            fetch_v(c0)
            # The 0 / 1 lower triangle [i, t] = 1 where t <= i: the cumsum's left operand and the scores' mask.
            tri_sm.at[s][...] = jnp.clip(1.0 + row_minus_col(BT, acc, interpret), 0.0, 1.0).astype(tri_sm.dtype)
            plgpu.commit_smem()
            _wait(bar, nb + WB, 1)
            ws = ld(w_sm.at[s], acc.reduce(0))
            if outputs:
                _wait(bar, nb + SB, 2 * nk)
                init = tuple(
                    ld(sth_sm.at[s, j], acc).astype(f32) + ld(stl_sm.at[s, j], acc).astype(f32) for j in range(nk)
                )
            else:
                init = tuple(zeros((BV, BK), acc, interpret) for _ in range(nk))

            def step(n, carry):
                c = c0 + n
                more = n + 1 < NC
                states = list(carry)
                if outputs:
                    a = zeros((BT, BT), acc, interpret)
                    o = zeros((BT, BV), acc, interpret)
                for j in range(nk):
                    hi_sm, lo_sm = g_sm.at[s, j], k_sm.at[s, j]  # kd's halves go where g_s and k were
                    _wait(bar, nb + GB + j, 1)
                    gb = mma(zeros((BT, BK), acc, interpret), [(tri_sm.at[s], hi_sm)])  # b: inclusive cumsum
                    _wait(bar, nb + LB + j, 1)
                    bl_j = ld(bl_sm.at[s, j], acc.reduce(0))
                    m = 0.5 * bl_j
                    em = jnp.exp(m)
                    dd = jnp.minimum(jnp.maximum(gb - cols(m), -lim), lim)
                    _wait(bar, nb + KB + j, 1)
                    kf = ld(lo_sm, acc).astype(f32) * jnp.exp(-dd) * cols(em)
                    if outputs:
                        _wait(bar, nb + QB + j, 1)
                        qf = ld(q_sm.at[s, j], acc).astype(f32) * jnp.exp(dd)
                    split_halves(kf, hi_sm, lo_sm)
                    plgpu.commit_smem()  # kd's halves visible to the WGMMAs; bL's and q's tiles read

                    @pl.when(more)
                    def _(j=j):
                        fetch_bl(c + 1, j)
                        if outputs:
                            fetch_q(c + 1, j)

                    if outputs:
                        xh, xl = halves(qf * cols(ws * jnp.exp(jnp.minimum(-m, lim))))
                        a = mma(a, [(xh, ("T", hi_sm)), (xh, ("T", lo_sm)), (xl, ("T", hi_sm))])
                        qh, ql = halves(qf * cols(em * ws))
                        sh, sl = ("T", sth_sm.at[s, j]), ("T", stl_sm.at[s, j])  # S [BK, BV] entering chunk c
                        o = mma(o, [(qh, sh), (qh, sl), (ql, sh)])
                    if j == 0:
                        _wait(bar, nb + VB, 1)
                    vt = ("T", v_sm.at[s])  # [BV, BT]
                    states[j] = mma(states[j] * cols(jnp.exp(bl_j)), [(vt, hi_sm), (vt, lo_sm)])

                    @pl.when(more)
                    def _(j=j):
                        fetch_kg(c + 1, j)

                    if outputs:  # the halves of the state entering chunk c + 1, for its output product
                        split_halves(states[j], sth_sm.at[s, j], stl_sm.at[s, j])
                if outputs:
                    plgpu.commit_smem()
                    ah, al = halves(a * ld(tri_sm.at[s], acc).astype(f32))  # masked to j <= i
                    o = mma(o, [(ah, v_sm.at[s]), (al, v_sm.at[s])])

                @pl.when(more)
                def _():
                    fetch_v(c + 1)

                if outputs:
                    if s == 1:  # hand o_1 over: wait until warpgroup 0 has read the previous one

                        @pl.when(n > 0)
                        def _():
                            plgpu.barrier_wait(xbar.at[1])

                        x_sm[...] = o
                        plgpu.barrier_arrive(xbar.at[0])
                    else:
                        plgpu.barrier_wait(xbar.at[0])
                        o = o + ld(x_sm, acc)
                        plgpu.barrier_arrive(xbar.at[1])
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous chunk's o has left o_sm
                        o_sm[...] = o.astype(o_sm.dtype)
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(o_sm, o_ref.at[b, ts(c), h, vs])
                return tuple(states)

            final = lax.fori_loop(0, NC, step, init)
            if outputs:
                if s == 1:
                    plgpu.barrier_wait(xbar.at[1])  # the last hand-over's completion
                hs, ls = sth_sm, stl_sm  # they hold the final states' halves already
            else:
                hs, ls = k_sm, g_sm  # free now: stage the final state's halves
                for j in range(nk):
                    split_halves(final[j], hs.at[s, j], ls.at[s, j])
            plgpu.commit_smem()
            for j in range(nk):
                plgpu.copy_smem_to_gmem(hs.at[s, j], sout_ref.at[bh, p, s, 0, vs, ks(j)])
                plgpu.copy_smem_to_gmem(ls.at[s, j], sout_ref.at[bh, p, s, 1, vs, ks(j)])
            plgpu.wait_smem_to_gmem(0)

        for s in range(2):
            pl.when(wg == s)(lambda s=s: thread(s))

    tile16 = lambda n: plgpu.SMEM((2, n, BT, BK), bf16, transforms=sw16)  # noqa: E731
    scratch = [
        *([tile16(nk)] if outputs else []),  # q halves
        tile16(nk),  # k halves, then kd_lo
        tile16(nk),  # g_s halves, then kd_hi
        plgpu.SMEM((2, BT, BV), bf16, transforms=sw16),  # v
        plgpu.SMEM((2, BT, BT), bf16, transforms=sw16),  # the triangle
        plgpu.SMEM((2, nk, BK), f32),  # bL halves
        plgpu.SMEM((2, BK), f32),  # scale w_s
    ]
    if outputs:
        scratch += [
            tile16(nk),  # S_s^T hi halves
            tile16(nk),  # S_s^T lo halves
            plgpu.SMEM((BT, BV), f32, transforms=sw32),  # o_1, handed to warpgroup 0
            plgpu.SMEM((BT, BV), bf16, transforms=sw16),  # o, staged for its TMA store
        ]
    scratch.append(plgpu.Barrier(num_barriers=2 * NB))
    if outputs:
        scratch.append(plgpu.Barrier(num_barriers=2))  # hand-over: ready (0), free (1)
    states = jax.ShapeDtypeStruct((B * H, count, 2, 2, V, K), bf16)
    out_type = (jax.ShapeDtypeStruct((B, T, H, V), bf16), states) if outputs else states
    kernel = launch(
        body,
        name="dsla_fwd_fused_mgpu" if outputs else "dsla_seg_fused_mgpu",
        interpret=interpret,
        reduction_scratch_bytes=0,
        out_type=out_type,
        grid=(V // BV, B * H, count),
        grid_names=("iv", "bh", "p"),
        num_threads=2,
        thread_name="wg",
        scratch_types=scratch,
    )
    bl = bl.astype(f32)
    if outputs:
        return kernel(wv, q, k, v, g1, g2, bl, s_in)
    return kernel(wv, k, v, g1, g2, bl)


def fwd_fused_mgpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g1: jax.Array,
    g2: jax.Array,
    w: jax.Array,
    bl: jax.Array,
    s_in: jax.Array,
    *,
    scale: float,
    P: int,
    thresh: float = THRESH,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """o and each segment's final states, every segment in parallel from its entering states. Exact (to rounding)
    only where every chunk's decay range max over K and both states of -bL is <= thresh.

    Args:
        q, k, g1, g2: [B, T, H, K] bfloat16 (K 64 or 128); v: [B, T, H, V] bfloat16; w: [2] float32 mix; bl: [2, B * H,
            N, K] float32 per-chunk gate sums (`pallas_gpu.chunk_gate_sums`), N = T / 64; s_in: [B * H, P, 2, 2, V, K]
            bfloat16 halves of the transposed states entering each segment (`split_states`).
        scale: the output scale; P: segments (T a multiple of 64 P); thresh: the decay range bound.

    Returns:
        o [B, T, H, V] bfloat16 and the segments' final states [B * H, P, 2, 2, V, K] as bfloat16 halves.
    """
    return _kernel(
        q, k, v, g1, g2, w, bl, s_in, scale=scale, P=P, outputs=True, count=P, thresh=thresh, interpret=interpret
    )


def seg_states_fused_mgpu(
    k: jax.Array,
    v: jax.Array,
    g1: jax.Array,
    g2: jax.Array,
    bl: jax.Array,
    *,
    P: int,
    count: int,
    thresh: float = THRESH,
    interpret: bool = False,
) -> jax.Array:
    """Each of segments 0 .. count - 1's state summary from zero ([B * H, count, 2, 2, V, K] bfloat16 halves of the
    transposed states): `fwd_fused_mgpu`'s state updates alone, from k, v and the gates. The segments' total decays
    are exp(sum of bL), left to the caller."""
    w = jnp.zeros((2,), f32)
    return _kernel(
        None, k, v, g1, g2, w, bl, None, scale=1.0, P=P, outputs=False, count=count, thresh=thresh, interpret=interpret
    )
