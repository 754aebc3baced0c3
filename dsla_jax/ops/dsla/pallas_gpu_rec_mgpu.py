"""Mosaic GPU kernels for the DSLA split form's sequential passes (`GpuConfig(rec="mosaic")`, picked by "auto" on
Hopper): `fwd_rec_mgpu` (the forward's recurrent kernel, Triton twin `pallas_gpu.fwd_rec_gpu`), `seg_states_mgpu`
(the forward's segment pass, twin `pallas_gpu.seg_states_split_gpu`), `chunk_states_mgpu` (the backward's state
pass, twin `pallas_gpu_bwd.chunk_states_gpu`) and `chunk_adjoints_mgpu` (the backward's adjoint pass, the same twin
with reverse=True): the per-chunk work on tensor cores through WGMMA, with explicit TMA copies. The backward's
gradient kernels are in `pallas_gpu_bwd_mgpu`. Measured against the twins in `docs/benchmarks.md` (v9, v10).

The recurrent kernel:

Per program (value tile of BV columns, batch x head, segment), one warpgroup walks the segment's chunks with both
states transposed in registers, S_s^T [BV, K] float32 (WGMMA accumulators), and per chunk:
    o     = o_intra + qd_1 S_1 + qd_2 S_2                    (tf32 WGMMA: qd [BT, K] and S_s^T from shared memory)
    S_s^T = S_s^T diag(exp(bL_s)) + v^T (kd_s,hi + kd_s,lo)  (bf16 WGMMA, float32 accumulation)
The state update contracts over tokens, which float32 (tf32) WGMMA cannot read transposed, so the decayed keys come
as two bfloat16 halves, kd = kd_hi + kd_lo (exact to ~2^-16 relative, finer than tf32's 2^-11), and v (bfloat16
inputs) is exact in bfloat16: only bfloat16 / float16 inputs take this kernel. Each input buffer is single: its
next chunk's copy starts as soon as the chunk's matmul that reads it is done (two buffers of 64-token float32 tiles
do not fit in shared memory), so the copies overlap the rest of the step.

Layouts: qd [2, B H, T, K] float32, kd [4, B H, T, K] bfloat16 (hi, lo per state), ebl = exp(bL) [2, B H, N, K] float32,
v [B, T, H, V], o_intra [B H, T, V] float32, entering states transposed [B H, P, 2, V, K] float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dsla_jax.ops.dsla.mgpu import halves, kernel_ops, launch, split_halves, swizzles, zeros
from dsla_jax.ops.dsla.pallas_gpu import round_tf32

f32 = jnp.float32


def tiles_problem(chunk: int, block_v: int, K: int, V: int, dtype) -> str | None:
    """Why the Mosaic GPU kernels here (and in `pallas_gpu_bwd_mgpu`) cannot take these tiles and v's dtype, or None:
    64-token chunks (WGMMA rows), a value tile and key dim that are multiples of 64, a value tile dividing V, and
    16-bit v (the state update is a bf16 WGMMA on kd's halves and v). `pallas.resolve_rec` asks the same."""
    if chunk != 64 or V % block_v or block_v % 64 or K % 64:
        return f"chunk 64, block_v % 64 == 0 dividing V, K % 64 == 0 (got {chunk}, {block_v}, {K}, V={V})"
    if jnp.dtype(dtype).itemsize != 2:
        return f"16-bit v (its state update is a bf16 WGMMA), got {jnp.dtype(dtype).name}"
    return None


def _check(what: str, BT: int, BV: int, K: int, T: int, P: int, v: jax.Array) -> None:
    """Raise a clear error unless `tiles_problem` accepts these tiles and T is a whole number of segments."""
    problem = tiles_problem(BT, BV, K, v.shape[-1], v.dtype)
    if problem is None and T % (P * BT):
        problem = f"T={T} a multiple of segments x chunk ({P} x {BT})"
    if problem is not None:
        raise ValueError(f"the Mosaic GPU {what} needs {problem}")


def _update_scratch(kd: jax.Array, v: jax.Array, BT: int, K: int, BV: int) -> list:
    """Shared memory for a chunk's state-update inputs: kd_hi, kd_lo ([2, BT, K] each), exp(bL) [2, K], v [BT, BV]."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    sw16 = swizzles()[1]
    return [
        plgpu.SMEM((2, BT, K), kd.dtype, transforms=sw16),
        plgpu.SMEM((2, BT, K), kd.dtype, transforms=sw16),
        plgpu.SMEM((2, K), f32),
        plgpu.SMEM((BT, BV), v.dtype, transforms=sw16),
    ]


def _fetch_update(kd_ref, ebl_ref, v_ref, smem, bar, first: int, c, *, bh, b, h, vs, BT: int) -> None:
    """Start the TMA copies of chunk c's state-update inputs into `smem` (`_update_scratch`'s buffers), one copy per
    barrier (a copy arrives once): kd_hi, kd_lo of state s on first + s, first + 2 + s, v on first + 4, exp(bL) on
    first + 5. Swizzled tiles go one state at a time (at most 5 strided dimensions per copy)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    kdh_sm, kdl_sm, e_sm, v_sm = smem
    ts = pl.ds(c * BT, BT)
    for s in range(2):
        plgpu.copy_gmem_to_smem(kd_ref.at[2 * s, bh, ts], kdh_sm.at[s], bar.at[first + s])
        plgpu.copy_gmem_to_smem(kd_ref.at[2 * s + 1, bh, ts], kdl_sm.at[s], bar.at[first + 2 + s])
    plgpu.copy_gmem_to_smem(v_ref.at[b, ts, h, vs], v_sm, bar.at[first + 4])
    plgpu.copy_gmem_to_smem(ebl_ref.at[:, bh, c], e_sm, bar.at[first + 5])


def _wait(bar, first: int, count: int) -> None:
    from jax.experimental.pallas import mosaic_gpu as plgpu

    for i in range(first, first + count):
        plgpu.barrier_wait(bar.at[i])


def _update_transposed(states, smem, ld, mma, BV: int, K: int) -> tuple:
    """S_s^T [BV, K] <- S_s^T diag(exp(bL_s)) + v^T (kd_s,hi + kd_s,lo) for both states, from `smem`."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    kdh_sm, kdl_sm, e_sm, v_sm = smem
    acc = plgpu.Layout.WGMMA
    vt = ("T", v_sm)  # [BV, BT]
    decays = [lax.broadcast_in_dim(ld(e_sm.at[s], acc.reduce(0)), (BV, K), [1]) for s in range(2)]
    return tuple(mma(st * e, [(vt, kdh_sm.at[s]), (vt, kdl_sm.at[s])]) for s, (st, e) in enumerate(zip(states, decays)))


def _update_natural(states, hi_sm, lo_sm, e_sm, y_sm, ld, mma, K: int, BV: int) -> tuple:
    """S_s [K, BV] <- diag(e_s) S_s + (x_s,hi + x_s,lo)^T y for both states, from shared memory (hi_sm, lo_sm:
    [2, BT, K] bfloat16 halves of x, read transposed; e_sm: [2, K]; y_sm: [BT, BV] 16-bit): the state pass's
    update (x = kd, y = v) and the adjoint pass's (x = qd, y = do)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    acc = plgpu.Layout.WGMMA
    new = []
    for s, st in enumerate(states):
        e = lax.broadcast_in_dim(ld(e_sm.at[s], acc.reduce(1)), (K, BV), [0])
        new.append(mma(st * e, [(("T", hi_sm.at[s]), y_sm), (("T", lo_sm.at[s]), y_sm)]))
    return tuple(new)


def _store_pair(st_sm, values, dsts) -> None:
    """Both states' [K, BV] tiles to global memory through st_sm by TMA, once the previous stores have read it."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for s in range(2):
        st_sm.at[s][...] = values[s]
    plgpu.commit_smem()
    for s in range(2):
        plgpu.copy_smem_to_gmem(st_sm.at[s], dsts[s])


def fwd_rec_mgpu(
    qd: jax.Array,
    kd: jax.Array,
    ebl: jax.Array,
    v: jax.Array,
    oi: jax.Array,
    s_in_t: jax.Array,
    *,
    P: int,
    chunk: int = 64,
    block_v: int = 64,
    round_states: bool = True,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """o and each segment's final states from the split intra kernel's outputs (all segments in parallel).

    Args:
        qd: [2, B * H, T, K] float32 decayed, scaled and mixed queries.
        kd: [4, B * H, T, K] bfloat16 halves of the decayed keys, plane 2 s + 0 (hi) and 2 s + 1 (lo) for state s
            (`split_kd`, or the intra kernel's "kd-bf16x2" storage).
        ebl: [2, B * H, T / chunk, K] float32 chunk decays exp(bL).
        v: [B, T, H, V] bfloat16 or float16.
        oi: [B * H, T, V] float32 intra-chunk outputs.
        s_in_t: [B * H, P, 2, V, K] float32 states entering each segment, transposed.
        P: segments; chunk: BT (64: WGMMA rows); block_v: BV (64).
        round_states: round the states to tf32 to nearest where the output matmul reads them (else the tensor
            cores truncate them).

    Returns:
        o [B, T, H, V] in v's dtype and the segments' final states, transposed [B * H, P, 2, V, K] float32.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    B, T, H, V = v.shape
    K = qd.shape[-1]
    BT, BV = chunk, block_v
    _check("recurrent kernel", BT, BV, K, T, P, v)
    NC = T // (P * BT)
    acc = plgpu.Layout.WGMMA
    sw32, sw16 = swizzles()
    ld, mma = kernel_ops(interpret)

    def body(qd_ref, kd_ref, ebl_ref, v_ref, oi_ref, sin_ref, o_ref, sout_ref, *scratch):
        qd_sm, *upd_sm, oi_sm, st_sm, o_sm, bar = scratch  # upd_sm: `_update_scratch`'s four buffers
        iv, bh, p = lax.axis_index("iv"), lax.axis_index("bh"), lax.axis_index("p")
        b, h = lax.div(bh, H), lax.rem(bh, H)
        vs = pl.ds(iv * BV, BV)

        # One copy per barrier: 0-2 the output matmul's inputs, 3-8 the state update's, 9-10 the entering states.
        def fetch_q(c):  # what the output matmul reads
            ts = pl.ds(c * BT, BT)
            for s in range(2):
                plgpu.copy_gmem_to_smem(qd_ref.at[s, bh, ts], qd_sm.at[s], bar.at[s])
            plgpu.copy_gmem_to_smem(oi_ref.at[bh, ts, vs], oi_sm, bar.at[2])

        def fetch_k(c):  # what the state update reads
            _fetch_update(kd_ref, ebl_ref, v_ref, upd_sm, bar, 3, c, bh=bh, b=b, h=h, vs=vs, BT=BT)

        c0 = p * NC
        for s in range(2):
            plgpu.copy_gmem_to_smem(sin_ref.at[bh, p, s, vs], st_sm.at[s], bar.at[9 + s])
        fetch_q(c0)
        fetch_k(c0)
        _wait(bar, 9, 2)
        carry0 = (ld(st_sm.at[0], acc), ld(st_sm.at[1], acc))

        def step(n, carry):
            c = c0 + n  # carry: S_s^T entering chunk c, also in st_sm
            _wait(bar, 0, 3)
            st = [("T", st_sm.at[s]) for s in range(2)]  # S_s [K, BV], K fastest
            o = mma(ld(oi_sm, acc), [(qd_sm.at[0], st[0]), (qd_sm.at[1], st[1])])

            @pl.when(n + 1 < NC)
            def _():
                fetch_q(c + 1)

            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous chunk's o has left o_sm
            o_sm[...] = o.astype(o_sm.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_sm, o_ref.at[b, pl.ds(c * BT, BT), h, vs])
            _wait(bar, 3, 6)
            s1, s2 = _update_transposed(carry, upd_sm, ld, mma, BV, K)

            @pl.when(n + 1 < NC)
            def _():
                fetch_k(c + 1)

            rnd = round_tf32 if round_states else (lambda x: x)
            st_sm.at[0][...] = rnd(s1)  # the next chunk's output matmul reads them here, as tf32: rounded
            st_sm.at[1][...] = rnd(s2)  # to nearest (the tensor cores would drop the low bits)
            plgpu.commit_smem()
            return s1, s2

        s_end = lax.fori_loop(0, NC, step, carry0)
        for s in range(2):  # the exact states (st_sm holds their tf32 roundings)
            st_sm.at[s][...] = s_end[s]
        plgpu.commit_smem()
        for s in range(2):
            plgpu.copy_smem_to_gmem(st_sm.at[s], sout_ref.at[bh, p, s, vs])
        plgpu.wait_smem_to_gmem(0)

    kernel = launch(
        body,
        name="dsla_fwd_rec_mgpu",
        interpret=interpret,
        out_type=(jax.ShapeDtypeStruct((B, T, H, V), v.dtype), jax.ShapeDtypeStruct(s_in_t.shape, f32)),
        grid=(V // BV, B * H, P),
        grid_names=("iv", "bh", "p"),
        scratch_types=[
            plgpu.SMEM((2, BT, K), f32, transforms=sw32),  # qd
            *_update_scratch(kd, v, BT, K, BV),
            plgpu.SMEM((BT, BV), f32, transforms=sw32),  # o_intra
            plgpu.SMEM((2, BV, K), f32, transforms=sw32),  # S_s^T
            plgpu.SMEM((BT, BV), v.dtype, transforms=sw16),  # o, staged for its TMA store
            plgpu.Barrier(num_barriers=11),
        ],
    )
    return kernel(qd, kd, ebl, v, oi, s_in_t)


def seg_states_mgpu(
    kd: jax.Array,
    ebl: jax.Array,
    v: jax.Array,
    *,
    P: int,
    count: int,
    chunk: int = 64,
    block_v: int = 64,
    interpret: bool = False,
) -> jax.Array:
    """Per-segment state summaries from zero for segments 0 .. count - 1 (the split forward's segment pass, the
    state update of `fwd_rec_mgpu` alone: no queries, no outputs; the segments' total decays are products of ebl,
    left to the caller).

    Args:
        kd: [4, B * H, T, K] bfloat16 halves of the decayed keys (as `fwd_rec_mgpu`); ebl: [2, B * H, N, K]
            float32; v: [B, T, H, V] 16-bit.

    Returns:
        summaries, transposed: [B * H, count, 2, V, K] float32.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    B, T, H, V = v.shape
    K = kd.shape[-1]
    BT, BV = chunk, block_v
    _check("segment pass", BT, BV, K, T, P, v)
    NC = T // (P * BT)
    ld, mma = kernel_ops(interpret)

    def body(kd_ref, ebl_ref, v_ref, sout_ref, *scratch):
        *upd_sm, st_sm, bar = scratch
        iv, bh, p = lax.axis_index("iv"), lax.axis_index("bh"), lax.axis_index("p")
        b, h = lax.div(bh, H), lax.rem(bh, H)
        vs = pl.ds(iv * BV, BV)

        def fetch(c):
            _fetch_update(kd_ref, ebl_ref, v_ref, upd_sm, bar, 0, c, bh=bh, b=b, h=h, vs=vs, BT=BT)

        c0 = p * NC
        fetch(c0)
        zero = zeros((BV, K), plgpu.Layout.WGMMA, interpret)

        def step(n, carry):
            _wait(bar, 0, 6)
            new = _update_transposed(carry, upd_sm, ld, mma, BV, K)

            @pl.when(n + 1 < NC)
            def _():
                fetch(c0 + n + 1)

            return new

        for s, st in enumerate(lax.fori_loop(0, NC, step, (zero, zero))):  # one staging tile, a state at a time
            if s:
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            st_sm[...] = st
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(st_sm, sout_ref.at[bh, p, s, vs])
        plgpu.wait_smem_to_gmem(0)

    kernel = launch(
        body,
        name="dsla_seg_states_mgpu",
        interpret=interpret,
        out_type=jax.ShapeDtypeStruct((B * H, count, 2, V, K), f32),
        grid=(V // BV, B * H, count),
        grid_names=("iv", "bh", "p"),
        scratch_types=[
            *_update_scratch(kd, v, BT, K, BV),
            plgpu.SMEM((BV, K), f32, transforms=swizzles()[0]),
            plgpu.Barrier(num_barriers=6),
        ],
    )
    return kernel(kd, ebl, v)


def chunk_states_mgpu(
    kd: jax.Array,
    ebl: jax.Array,
    v: jax.Array,
    s_in: jax.Array,
    *,
    P: int,
    chunk: int = 64,
    block_v: int = 64,
    interpret: bool = False,
) -> jax.Array:
    """The state entering every chunk (the split backward's state pass, `pallas_gpu_bwd.chunk_states_gpu` forward,
    from the forward's kd halves and ebl instead of recomputing the decays): S_s [K, BV] as WGMMA accumulators in
    their natural layout (the token contraction kd_s^T v reads both bfloat16 operands transposed, which 16-bit WGMMA
    allows), each chunk's entering states stored by TMA while the next update runs.

    Args:
        kd: [4, B * H, T, K] bfloat16 halves (as `fwd_rec_mgpu`); ebl: [2, B * H, N, K] float32; v: [B, T, H, V]
            16-bit; s_in: [B * H, P, 2, K, V] float32 states entering each segment.

    Returns:
        [2, B * H, N, K, V] float32: the states entering every chunk.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    B, T, H, V = v.shape
    K = kd.shape[-1]
    BT, BV = chunk, block_v
    _check("state pass", BT, BV, K, T, P, v)
    NC, N = T // (P * BT), T // BT
    acc = plgpu.Layout.WGMMA
    ld, mma = kernel_ops(interpret)

    def body(kd_ref, ebl_ref, v_ref, sin_ref, hs_ref, *scratch):
        *upd_sm, st_sm, bar = scratch
        kdh_sm, kdl_sm, e_sm, v_sm = upd_sm
        iv, bh, p = lax.axis_index("iv"), lax.axis_index("bh"), lax.axis_index("p")
        b, h = lax.div(bh, H), lax.rem(bh, H)
        vs = pl.ds(iv * BV, BV)

        def fetch(c):
            _fetch_update(kd_ref, ebl_ref, v_ref, upd_sm, bar, 0, c, bh=bh, b=b, h=h, vs=vs, BT=BT)

        c0 = p * NC
        for s in range(2):
            plgpu.copy_gmem_to_smem(sin_ref.at[bh, p, s, :, vs], st_sm.at[s], bar.at[6 + s])
        fetch(c0)
        _wait(bar, 6, 2)
        carry0 = (ld(st_sm.at[0], acc), ld(st_sm.at[1], acc))

        def step(n, carry):
            c = c0 + n
            _store_pair(st_sm, carry, [hs_ref.at[s, bh, c, :, vs] for s in range(2)])  # the states entering c
            _wait(bar, 0, 6)
            new = _update_natural(carry, kdh_sm, kdl_sm, e_sm, v_sm, ld, mma, K, BV)

            @pl.when(n + 1 < NC)
            def _():
                fetch(c + 1)

            return tuple(new)

        lax.fori_loop(0, NC, step, carry0)
        plgpu.wait_smem_to_gmem(0)

    kernel = launch(
        body,
        name="dsla_chunk_states_mgpu",
        interpret=interpret,
        out_type=jax.ShapeDtypeStruct((2, B * H, N, K, V), f32),
        grid=(V // BV, B * H, P),
        grid_names=("iv", "bh", "p"),
        scratch_types=[
            *_update_scratch(kd, v, BT, K, BV),
            plgpu.SMEM((2, K, BV), f32, transforms=swizzles()[0]),
            plgpu.Barrier(num_barriers=8),
        ],
    )
    return kernel(kd, ebl, v, s_in)


def chunk_adjoints_mgpu(
    qd: jax.Array,
    ebl: jax.Array,
    do: jax.Array,
    *,
    P: int,
    chunk: int = 64,
    block_v: int = 64,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """The segment-local adjoint of the state leaving every chunk (the split backward's adjoint pass,
    `pallas_gpu_bwd.chunk_states_gpu(reverse=True)`, from the forward's decayed queries instead of recomputing the
    decays): every segment from zero at its end, backward in time,

        D_{c-1} = diag(exp(bL_c)) D_c + qd_c^T do_c        (qd = scale w_s q exp(b), the forward's own)

    with D_s [K, BV] float32 WGMMA accumulators in their natural layout, as `chunk_states_mgpu`. The token
    contraction qd^T do reads qd transposed, which tf32 WGMMA cannot: each chunk's float32 qd tile is split in the
    kernel into bfloat16 halves (hi + lo, exact for the tf32-rounded qd of split_dtype "kd-bf16x2", ~2^-16
    relative otherwise) for two bf16 WGMMAs. Each chunk's adjoint is stored by TMA while the next update runs.

    Args:
        qd: [2, B * H, T, K] float32 decayed, scaled and mixed queries (the split intra kernel's), or their
            bfloat16 halves [4, B * H, T, K] (split_dtype "qkd-bf16x2": copied straight into the WGMMA operands,
            no split in the kernel, no float32 staging); ebl: [2, B * H,
            N, K] float32 chunk decays exp(bL); do: [B, T, H, V] 16-bit output cotangent.

    Returns:
        dl [2, B * H, N, K, V] float32, the segment-local adjoint of the state leaving every chunk, and send
        [B * H, P, 2, K, V], each segment's local adjoint entering it (the decays to the segment ends are products
        of ebl, left to the caller: `adjoint_decays`).
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    B, T, H, V = do.shape
    K = qd.shape[-1]
    BT, BV = chunk, block_v
    _check("adjoint pass", BT, BV, K, T, P, do)
    halves_in = qd.dtype == jnp.bfloat16 and qd.shape[0] == 4  # split_dtype "qkd-bf16x2": copied as they are
    if not halves_in and (qd.dtype != f32 or qd.shape[0] != 2):
        raise ValueError(
            f"the Mosaic GPU adjoint pass reads float32 qd [2, B H, T, K] or its bfloat16 halves [4, B H, T, K], got"
            f" {qd.dtype} {qd.shape}"
        )
    NC, N = T // (P * BT), T // BT
    acc = plgpu.Layout.WGMMA
    sw32, sw16 = swizzles()
    ld, mma = kernel_ops(interpret)

    def body(qd_ref, ebl_ref, do_ref, dl_ref, send_ref, *scratch):
        q32_sm, qh_sm, ql_sm, e_sm, do_sm, st_sm, bar = scratch if not halves_in else (None, *scratch)
        iv, bh, p = lax.axis_index("iv"), lax.axis_index("bh"), lax.axis_index("p")
        b, h = lax.div(bh, H), lax.rem(bh, H)
        vs = pl.ds(iv * BV, BV)

        def fetch_q(c):  # one copy per barrier: qd of state s on s (its halves: hi on s, lo on 4 + s)
            ts = pl.ds(c * BT, BT)
            for s in range(2):
                if halves_in:
                    plgpu.copy_gmem_to_smem(qd_ref.at[2 * s, bh, ts], qh_sm.at[s], bar.at[s])
                    plgpu.copy_gmem_to_smem(qd_ref.at[2 * s + 1, bh, ts], ql_sm.at[s], bar.at[4 + s])
                else:
                    plgpu.copy_gmem_to_smem(qd_ref.at[s, bh, ts], q32_sm.at[s], bar.at[s])

        def fetch_rest(c):  # do on 2, exp(bL) on 3
            plgpu.copy_gmem_to_smem(do_ref.at[b, pl.ds(c * BT, BT), h, vs], do_sm, bar.at[2])
            plgpu.copy_gmem_to_smem(ebl_ref.at[:, bh, c], e_sm, bar.at[3])

        c_end = p * NC + NC - 1
        fetch_q(c_end)
        fetch_rest(c_end)
        zero = zeros((K, BV), acc, interpret)

        def step(n, carry):
            c = c_end - n  # carry: D_s, the adjoint of the state leaving chunk c
            _store_pair(st_sm, carry, [dl_ref.at[s, bh, c, :, vs] for s in range(2)])
            _wait(bar, 0, 6 if halves_in else 4)
            if not halves_in:
                for s in range(2):  # qd's bfloat16 halves for the transposed operand
                    split_halves(ld(q32_sm.at[s], acc), qh_sm.at[s], ql_sm.at[s])
                plgpu.commit_smem()  # also a warpgroup barrier: every read of q32_sm is done before its next copy

                @pl.when(n + 1 < NC)
                def _():
                    fetch_q(c - 1)

            new = _update_natural(carry, qh_sm, ql_sm, e_sm, do_sm, ld, mma, K, BV)  # D_s <- diag(ebl) D_s + qd^T do

            @pl.when(n + 1 < NC)
            def _():
                if halves_in:  # the update has read the halves
                    fetch_q(c - 1)
                fetch_rest(c - 1)

            return tuple(new)

        d_start = lax.fori_loop(0, NC, step, (zero, zero))
        _store_pair(st_sm, d_start, [send_ref.at[bh, p, s, :, vs] for s in range(2)])
        plgpu.wait_smem_to_gmem(0)

    kernel = launch(
        body,
        name="dsla_chunk_adjoints_mgpu",
        interpret=interpret,
        out_type=(
            jax.ShapeDtypeStruct((2, B * H, N, K, V), f32),
            jax.ShapeDtypeStruct((B * H, P, 2, K, V), f32),
        ),
        grid=(V // BV, B * H, P),
        grid_names=("iv", "bh", "p"),
        scratch_types=[
            *([] if halves_in else [plgpu.SMEM((2, BT, K), f32, transforms=sw32)]),  # qd as copied
            plgpu.SMEM((2, BT, K), jnp.bfloat16, transforms=sw16),  # its halves
            plgpu.SMEM((2, BT, K), jnp.bfloat16, transforms=sw16),
            plgpu.SMEM((2, K), f32),
            plgpu.SMEM((BT, BV), do.dtype, transforms=sw16),
            plgpu.SMEM((2, K, BV), f32, transforms=sw32),
            plgpu.Barrier(num_barriers=6 if halves_in else 4),
        ],
    )
    return kernel(qd, ebl, do)


def adjoint_decays(ebl: jax.Array, P: int) -> tuple[jax.Array, jax.Array]:
    """From the chunk decays ebl [2, B * H, N, K]: the decay from every chunk's end to its segment's end,
    [2, B * H, N, 1, K] (the layout the split backward's gradient kernels read: one value tile), and every
    segment's total decay [B * H, P, 2, K] (XLA products, in time order from each segment's end)."""
    two, BH, N, K = ebl.shape
    seg = ebl.reshape(two, BH, P, N // P, K)
    after = jnp.cumprod(seg[:, :, :, ::-1], axis=3)[:, :, :, ::-1]  # inclusive: chunks c .. the segment's end
    e = jnp.concatenate([after[:, :, :, 1:], jnp.ones_like(seg[:, :, :, :1])], axis=3)
    return e.reshape(two, BH, N, 1, K), jnp.moveaxis(after[:, :, :, 0], 0, 2)


def split_kd(kd: jax.Array) -> jax.Array:
    """[2, ...] float32 decayed keys as [4, ...] bfloat16 planes (hi, lo per state) whose float32 sums are kd to
    ~2^-16 relative (what the intra kernel writes itself with `GpuConfig.split_dtype="kd-bf16x2"`)."""
    return jnp.stack(halves(kd), axis=1).reshape(4, *kd.shape[1:])
