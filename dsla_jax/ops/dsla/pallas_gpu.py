"""DSLA Pallas kernels for GPUs (Triton lowering): chunked forward, segment summaries and the two backward kernels.

Notation (as FLA): B batch, T time (padded to a multiple of the chunk size times the number of segments), H heads
(k, v and gates already expanded to the query heads by the caller), K key dim, V value dim, BT chunk, BV value tile,
P segments, NC chunks per segment. Per chunk and state, with b the inclusive cumsum of the log gates inside the chunk
(b <= 0, decreasing) and bL its last row,

    o_i    = scale * [ (q_i * exp(b_i)) S + sum_{j <= i} A_ij v_j ],   A_ij = sum_K q_i k_j exp(b_i - b_j)
    S_next = diag(exp(bL)) S + sum_j (k_j * exp(bL - b_j))^T v_j.

Exponents. exp(b_i) and exp(bL - b_j) have exponents <= 0. The intra-chunk scores take one of two paths per chunk
and state, chosen at run time:

* fast (tensor cores): when the chunk's decay range R = max_K(-bL) is at most `thresh` (40 by default), A is one
  matmul of q * exp(b - bL/2) and k * exp(bL/2 - b): both exponents lie in [-R/2, R/2], so every factor is within
  exp(+-20) and each product q_ik k_jk exp(b_ik - b_jk) is formed to a rounding of its true value (nothing overflows
  or is lost). exp(b) and exp(bL - b) are then these factors times exp(bL/2) <= 1.
* exact (elementwise): otherwise (gates near -50 reach R = 3200 in a 64-token chunk) A is built column by column as
  sum_K q_i k_j exp(min(b_i - b_j, 0)), every exponent <= 0, and exp(b), exp(bL - b) are recomputed directly.
The fast path always runs (its factors clamped to exp(+-thresh/2), so the values it leaves for the exact path to
overwrite stay finite); the exact path is a loop whose trip count is 0 or BT. No `lax.cond`: the Triton compiler of
jax 0.11 rejects tensor-valued `scf.if` results, and its `select_n` lowering mistypes weak scalar operands, so the
kernels also use float masks instead of `jnp.where`.

Parallelism. A GPU needs ~2 programs per SM; at B = 1 there are only B * H * (V / BV) heads-tiles, so the sequence is
cut into P segments: `seg_states_gpu` computes each segment's state contribution from zero (and its total log
decay), the caller chains the P summaries in XLA (P is small), and `fwd_gpu` runs every segment from its entering
state in parallel. The backward kernels reuse this: `seg_states_gpu(reverse=True)` summarises the reverse (adjoint)
recurrence, `bwd_dq_gpu` runs forward in time from the saved segment states, `bwd_dkv_gpu` backward in time.

Split forward (the default, `GpuConfig.fwd = "split"`, FLA's structure). `fwd_intra_gpu` does all per-chunk work
that does not involve the carried states, for every chunk in parallel (grid B * H x N): gate cumsums, both paths of
the intra-chunk scores, o_intra = scale * sum_s w_s A_s v, and it stores qd_s = scale w_s q exp(b_s),
kd_s = k exp(bL_s - b_s) and exp(bL_s). `seg_states_split_gpu` sums each segment's state contribution from those, and
`fwd_rec_gpu` walks the chunks with loads and four matmuls per chunk, no exponentials:
o = o_intra + qd_1 S_1 + qd_2 S_2, S_s <- diag(exp(bL_s)) S_s + kd_s^T v. The fused form (`fwd_gpu`) does everything
inside the sequential loop (see docs/kernel_notes.md v3 for why that is slow).

Gate gradients. `bwd_dq_gpu` also writes the state entering every chunk and `bwd_dkv_gpu` turns it into
sum_V S_in * dS_in per chunk start (the exact gate gradient there); the dq, dk kernels leave out their i = j terms.
The caller (`pallas._finish_grads`) then needs reverse cumsums over single chunks only (see there).

Every kernel accumulates in float32 and carries its states in registers; the forward writes nothing per token but
the outputs. Kernels take full arrays (no BlockSpecs) and load [BT, *] tiles at computed offsets.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from dsla_jax.ops.dsla.mgpu import halves

f32 = jnp.float32

# Largest per-channel decay range of a chunk (in nats) for the matmul path of the intra-chunk scores.
THRESH = 40.0


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """Static tile and launch choices of the GPU kernels (hashable: a `custom_vjp` non-diff argument).

    Attributes:
        chunk: BT, tokens per chunk (power of two, >= 16).
        block_v: BV, value tile of the forward kernels (power of two dividing V).
        num_segments: P, sequence segments run in parallel (None: chosen from B * H and the kernels' lowering,
            see `pick_segments`).
        num_warps, num_stages: Triton launch parameters of the fused forward kernels.
        fwd: "split" (a parallel intra-chunk kernel, then a recurrent kernel of loads and matmuls only; see
            `fwd_split_gpu`), "onepass" (the intra kernel without decayed q / k stores, then a segment pass and a
            sequential kernel that recompute the decays, key-tiled states in registers; `pallas_gpu_onepass`; 3.4 ms
            against 1.6 at B1 T8192 on an H200) or "fused" (the v3/v4 sequential kernel with whole-K states;
            `fwd_gpu`).
        onepass_block_k, onepass_block_v, onepass_num_warps, onepass_num_stages: the one-pass kernels' key and value
            tiles (2 K / BK state tiles of [BK, BV] float32 per program) and Triton launch parameters.
        onepass_cumsum: the one-pass kernels' gate cumsum: "scan" or "bf16" (a 0/1 matmul on bfloat16 tensor
            cores: exact for bfloat16 gates; float32 gates take the scan).
        rec: the split forward's segment pass and recurrent kernel: "triton" (`seg_states_split_gpu`,
            `fwd_rec_gpu`), "mosaic" (`pallas_gpu_rec_mgpu`: Mosaic GPU kernels, WGMMA and TMA, one warpgroup per
            program, the states transposed in registers; 16-bit inputs, chunk 64, key dim and value tile multiples
            of 64, a Hopper or newer card; with split_dtype "float32" XLA splits kd into its bfloat16 halves,
            "kd-bf16x2" has the intra kernel write them) or "auto" (default): "mosaic" with split_dtype "kd-bf16x2"
            where it applies (not in interpret mode), else "triton". B1 T8192 H32 D128 bf16 on an H200, same call:
            forward 1.59 -> 1.30 ms (T32768 5.77 -> 4.76, B4 T8192 5.69 -> 4.41), same error against XLA (v9).
        bwd_states_mosaic: with rec "mosaic", the split backward's state pass runs on Mosaic GPU
            (`pallas_gpu_rec_mgpu.chunk_states_mgpu`) from the forward's kd halves and exp(bL), kept as residuals
            (8 bytes per token, head and key channel: 0.27 GB at B1 T8192 H32 D128) instead of recomputing decays.
            On an H200 at B1 T8192: the pass 0.90 -> 0.34 ms, forward + backward 7.01 -> 6.47 ms (v9, call 12).
        bwd_adjoints_mosaic: with rec "mosaic", the split backward's adjoint pass runs on Mosaic GPU
            (`pallas_gpu_rec_mgpu.chunk_adjoints_mgpu`) from the forward's float32 decayed queries, kept as a
            residual (8 bytes per token, head and key channel, as kd's halves) instead of recomputing decays.
            On an H200 at B1 T8192: the pass 1.11 -> 0.46 ms, forward + backward 6.48 -> 5.89 ms (v10, call 1).
        bwd_dv_mosaic: with rec "mosaic" and bwd_states_mosaic, the split backward's dv kernel runs on Mosaic GPU
            (`pallas_gpu_bwd_mgpu.dv_mgpu`) from the forward's kd halves. On an H200 at B1 T8192: the kernel 0.84 ->
            0.39 ms, forward + backward 5.88 -> 5.41 ms (v10, call 3).
        bwd_dqk_mosaic: with rec "mosaic", 16-bit inputs and grads_order "split", the split backward's dq / dk
            kernel runs on Mosaic GPU (`pallas_gpu_bwd_mgpu.dqk_mgpu`, one state per program). On an H200 at B1
            T8192: the kernel 2.39 -> 1.23 ms, forward + backward 5.98 -> 5.06 ms, finer dq and dg (v12, call 1).
        bwd_intra_mosaic: with bwd_dqk_mosaic, the intra-chunk dq / dk terms' fast path runs on Mosaic GPU
            (`pallas_gpu_bwd_mgpu.dqk_intra_mgpu`), the flags for the Triton exact fix-up from XLA's gate sums. On
            an H200 at B1 T8192: the kernel 0.95 -> 0.61 ms, forward + backward 5.05 -> 4.69-4.72 ms (v12, call 2).
        bwd_intra_fused: with bwd_intra_mosaic, the dq / dk kernel computes the intra-chunk terms' fast path
            itself (`pallas_gpu_bwd_mgpu.dqk_mgpu` with flags) instead of reading them from `dqk_intra_mgpu`; the
            Triton exact path writes only the flagged tiles (`pallas_gpu_bwd.intra_terms_fixup_gpu` without prior
            terms), which the kernel reads where flagged. On an H200 at B1 T8192: forward + backward 4.46-4.51 ->
            4.26-4.28 ms, the same gradient errors (the dq / dk kernel 1.24 -> 1.58-1.60 ms, the 0.61 ms kernel gone)
            (v13, calls 1-2).
        split_dtype: storage of the split form's decayed queries and keys: "float32" (both), "bfloat16" (both) or
            "kd-bfloat16" (keys only: they feed the states; the queries feed the outputs directly) or "kd-bf16x2"
            (keys as two bfloat16 halves, queries rounded to tf32: the Mosaic GPU kernels' operands).
        intra_num_warps, intra_num_stages: Triton launch parameters of the split form's intra-chunk kernel.
        rec_num_warps, rec_num_stages: the same for the split form's segment and recurrent kernels. One stage by
            default: a float32 64-token chunk loads 4 x 32 KB of decayed q / k per step, two buffers of which would
            not fit the 227 KB of shared memory of an H100 (bfloat16 storage or 32-token chunks can take 2-3).
        bwd: "split" (two passes store every chunk's state and adjoint, then one kernel computes all gradients of
            every chunk in parallel; `pallas_gpu_bwd`) or "fused" (a dq pass forward and a dk / dv pass backward in
            time, one state per program; `bwd_dq_gpu`, `bwd_dkv_gpu`).
        block_k: key tile of the kernels whose work is separate per key channel (the forward's intra-chunk kernel,
            the split backward's state passes and dq / dk kernel) or summed over it (the dv kernel).
        intra_block_k: key tile of the forward's intra-chunk kernel (None: block_k); 32 by default (its stack 320 ->
            56 bytes by `scripts/triton_resources.py`; forward 1.61 -> 1.56 ms at B1 T8192 on an H200).
        states_block_k, states_num_warps: key tile and warps of the split backward's two state passes (None: all of
            K / rec_num_warps). 32 keys at 4 warps by default: four times the programs, no spills, forward +
            backward 7.37 -> 7.10 ms on an H200 (whole K at 8 warps before; 64 keys at 8 warps spilled more and ran
            45% slower).
        cumsum: how every GPU kernel forms the in-chunk gate cumsums: "scan" (Triton's associative scan) or a 0/1
            matmul at "tf32x3" (float32-accurate on tensor cores) or "ieee".
        grads_order: how the dq / dk kernel is split: "split" (the default, FLA's split: a first kernel, one state
            per program, stores the intra-chunk terms of dq and dk in float32 (+0.5 GB of traffic at B1 T8192) on
            the fast path only, an exact fix-up pass redoes flagged tiles in place, and the second kernel adds the
            state terms and forms dg; 8.3 ms forward + backward on an H200 against 9.7 for "intra-first" in the
            same run), "intra-first" (one kernel: dA once, the intra-chunk terms, then the loop over state tiles)
            or "states-first" (the state loop first; slower still: 11.7 ms).
        grads_cumsum: how the dq / dk kernel forms the gate gradient's in-chunk reverse cumsum: "scan" (sum - cumsum
            + r in float32; the default: its 8-warp kernel does not spill, 7.7 ms against 7.9 ms for "dot") or
            "dot" (a 0/1 matmul at 3-pass tf32, or float32).
        grads_block_v, grads_num_warps, grads_num_stages: the dq / dk kernel (and by default the other gradient
            kernels): the value tile in which it streams the [K, V] states, and Triton launch parameters (8 warps:
            no register spills with the scan, 0.4 ms faster than 4). One stage: the software pipeliner
            double-buffers the float32 state tiles of the value loop, which overflowed the H100's shared memory.
        dv_block_v, dv_num_warps: the dv kernel's value tile and warps (None: grads_block_v, grads_num_warps); it
            recomputes the decayed keys once per value tile, so wider tiles read k and the gates fewer times
            (64 wide, 4 warps: 8.0 ms forward + backward on an H200 against 8.3 at 32 wide).
        dqk_intra_num_warps: warps of the intra-chunk kernels of grads_order="split" (None: grads_num_warps; 4:
            8.3 ms against 9.0 at 8).
        dqk_intra_block_k, dv_block_k: key tiles of those intra-chunk kernels and of the dv kernel (None: block_k).
        seg_block_k, seg_num_warps: key tile and warps of the split forward's segment pass (None: all of K /
            rec_num_warps); its state rows per key channel are separate recurrences, as in the backward's passes.
            64 keys by default: 193 -> 106 registers by `scripts/triton_resources.py`, forward 1.60 -> 1.56 ms at
            B1 T8192 on an H200 (32 keys at 4 warps: 1.63).
        fwd_fixup: the split forward's intra-chunk kernel runs the fast path only and a fix-up pass redoes the
            chunks past the decay bound in place (the exact path's loops out of the hot kernel's registers);
            False: both paths in one kernel.
        exact_block_k: key tile of that fix-up pass (None: intra_block_k). Its exact path loops over the chunk's
            columns once per key tile and state, so wider tiles mean fewer, wider loop steps. 64 by default: with
            every gate at -50, B1 T8192 forward 16.17 (32 keys) -> 11.36 ms (64; 128: 12.99) on an H200 in one
            call, 1.59 -> 1.56 ms at logsig gates; `fwd_fixup=False` was 9.54 ms at -50 (v9 call 1).
        intra_mosaic: with rec "mosaic", split_dtype "kd-bf16x2" and bfloat16 inputs (chunk 64, key and value dims
            multiples of 64), the split forward's intra-chunk kernel runs on Mosaic GPU
            (`pallas_gpu_intra_mgpu.fwd_intra_mgpu`: the fast path, WGMMA and TMA, two programs per SM at 106 KB of
            shared memory for D128), followed by the Triton fix-up launch for the chunks past the decay bound
            (flagged in XLA); elsewhere the Triton kernel runs. On an H200 at B1 T8192: the kernel 0.57 -> 0.51 ms,
            forward 1.28-1.30 -> 1.15-1.22 ms (error against XLA 1.0e-3 -> 7.1e-4), forward + backward 4.66 -> 4.56
            ms (v12, call 3).
        fwd_fused_mosaic: with rec "mosaic" and bfloat16 inputs (chunk 64, key dim 64 or 128, value dim a multiple
            of 64), the forward that is not differentiated runs as one fused Mosaic GPU kernel and its segment pass
            (`pallas_gpu_fused_mgpu`: q, k, v, g1, g2 read in bfloat16, only o written), or the split forward where
            a chunk's decay range exceeds thresh (`lax.cond` on the device). Under differentiation the split forward
            runs either way (its decayed q / k and scores are the backward's residuals). Off by default: slower
            than the split forward (B1 T8192 H32 D128 on an H200, both with APPROX_MATH: 1.53-1.68 ms against
            0.98-1.00; kernel_notes item 17 has the profile).
        rec_pair: with rec "mosaic", bfloat16 v, key dim 64 or 128 and V a multiple of 128, the split forward's
            recurrent kernel takes both 64-column value tiles of a head in one program (`pallas_gpu_rec_pair_mgpu`:
            two warpgroups share one copy of qd's and kd's tiles, the state is the register operand of bf16 WGMMAs,
            o^T is stored transposed) and the intra kernels write qd as bfloat16 halves (split_dtype "qkd-bf16x2"),
            which the backward's adjoint pass copies as they are. On by default: at B1 T8192 H32 D128 on an H200
            (same call) the forward went 0.997 -> 0.932 ms, forward + backward 3.88 -> 3.67, B1 T32768 3.68 -> 3.35,
            every error against XLA lower (o 7.0e-4 -> 3.7e-4); B1 T2048's forward went 0.311 -> 0.333 (kernel_notes
            item 18). In interpret mode the unpaired kernel runs: inside the op's jit the interpreter's two
            warpgroup threads stalled at their first cross-warpgroup barrier on a 2-core host (the kernel alone runs
            there: `tests/test_rec_pair_mgpu.py`).
        rec_pair_min_chunks: the forward that is not differentiated takes the paired kernel only where each segment
            has at least this many chunks: with few chunks a program's fixed costs (the states' hand-in and
            hand-out, the cross-warpgroup barriers) outweigh what sharing saves (B1 T2048, 8 chunks a segment, on
            an H200: 0.311 ms unpaired against 0.333 paired in v16, 0.313-0.321 against 0.327-0.330 in v17).
            Under differentiation the paired kernel runs whenever it applies: its qd halves save the backward's
            adjoint pass more (B1 T2048 forward + backward 1.155 -> 1.095 ms).
        bwd_pair: with the Mosaic backward, bfloat16 v and do, key dim 64 or 128 and V a multiple of 128, the
            split backward's state pass, (on qd's halves, with `rec_pair`) adjoint pass and (with a bfloat16 dv) dv
            kernel take both 64-column value tiles of a head in one program (`pallas_gpu_seq_pair_mgpu`,
            `pallas_gpu_dv_pair_mgpu`: two warpgroups share one copy of kd's / qd's bfloat16 planes and of the
            scores). On by default: at B1 T8192 H32 D128 on an H200 each pass went 0.31 -> 0.24 ms and forward +
            backward 3.67 -> 3.53 (same call, gradients bit-identical), the paired dv 3.53 -> 3.44 (another call;
            dv 5e-7 apart) (kernel_notes item 19). Not in interpret mode (as `rec_pair`; the kernels alone are
            tested there).
        save_states: under differentiation, the split forward's recurrent kernel stores the state entering every
            chunk (float32, 8 K V bytes per chunk and head: 0.54 GB at B1 T8192 H32 D128, 16x the other
            residuals) and the split backward reads them instead of recomputing them in its state pass. Off by
            default (FLA's choice too): on an H200 it saved 0.18 ms of 7.47 (forward + backward, B1 T8192), not
            worth 17 GB of residuals for 32 such layers. Only when the backward's chunk is the forward's.
        bwd_chunk, bwd_num_warps, bwd_num_stages: the chunk of both backward forms (it divides chunk) and the launch
            parameters of the fused one's kernels.
        state_dot: operand precision of the matmuls with a state: "tf32", "tf32x3", "bf16" or "ieee" (float32 exact).
        intra_dot: operand precision of the intra-chunk matmuls (scores and scores @ v).
        bwd_dot: operand precision of every matmul of the backward kernels (see `_bwd_numerics`).
        bwd_state_dot: the backward's matmuls with a state only (None: `bwd_dot`); single-pass tf32 by default,
            3-pass stays on the intra-chunk terms (`bwd_dot`).
        thresh: decay range bound of the fast intra-chunk path (see module docstring).
    """

    chunk: int = 64
    block_v: int = 64
    num_segments: int | None = None
    num_warps: int = 8
    num_stages: int = 2
    bwd_chunk: int = 64
    bwd_num_warps: int = 8
    bwd_num_stages: int = 2
    state_dot: str = "tf32"
    intra_dot: str = "tf32"
    bwd_dot: str = "tf32x3"
    bwd_state_dot: str | None = "tf32"
    thresh: float = THRESH
    fwd: str = "split"
    bwd: str = "split"
    block_k: int = 64
    intra_block_k: int | None = 32
    states_block_k: int | None = 32
    states_num_warps: int | None = 4
    grads_block_v: int = 32
    grads_num_warps: int = 8
    grads_num_stages: int = 1
    grads_cumsum: str = "scan"
    grads_order: str = "split"
    dv_block_v: int | None = 64
    dv_num_warps: int | None = 4
    dqk_intra_num_warps: int | None = 4
    dqk_intra_block_k: int | None = None
    seg_block_k: int | None = 64
    seg_num_warps: int | None = None
    dv_block_k: int | None = None
    save_states: bool = False
    fwd_fixup: bool = True
    exact_block_k: int | None = 64
    intra_mosaic: bool = True
    fwd_fused_mosaic: bool = False
    rec_pair: bool = True
    rec_pair_min_chunks: int = 16
    bwd_pair: bool = True
    cumsum: str = "scan"
    split_dtype: str = "float32"
    intra_num_warps: int = 4
    intra_num_stages: int = 1
    rec_num_warps: int = 8
    rec_num_stages: int = 1
    rec: str = "auto"
    bwd_states_mosaic: bool = True
    bwd_adjoints_mosaic: bool = True
    bwd_dv_mosaic: bool = True
    bwd_dqk_mosaic: bool = True
    bwd_intra_mosaic: bool = True
    bwd_intra_fused: bool = True
    onepass_block_k: int = 32
    onepass_block_v: int = 64
    onepass_num_warps: int = 8
    onepass_num_stages: int = 1
    onepass_cumsum: str = "scan"

    @property
    def fwd_block_v(self) -> int:
        """The value tile of the forward's sequential kernels (what sets the programs per segment)."""
        return self.onepass_block_v if self.fwd == "onepass" else self.block_v


SEGMENT_PROGRAMS = {"triton": 264, "mosaic": 132}


def pick_segments(batch_heads: int, num_chunks: int, v_tiles: int, target_programs: int = 264) -> int:
    """Segments P (a power of 2) so that B * H * V-tiles * P reaches `target_programs`, with at least 4 chunks per
    segment. `SEGMENT_PROGRAMS` holds the targets: ~2 programs per SM (132 SMs on an H100) for the Triton kernels,
    ~1 for the Mosaic GPU ones, which run one program per SM: at B1 T8192 H32 D128 bf16 on an H200, P 8 -> 4 took
    the forward 1.22 -> 1.10-1.13 ms and forward + backward 4.56-4.63 -> 4.47-4.49 (B1 T32768 forward 4.39 -> 4.18,
    P 16: 4.46; P 2 at B1 T8192: 1.155 / 4.398) (v12, calls 7-8)."""
    p = 1
    while batch_heads * v_tiles * p < target_programs and p * 2 <= max(1, num_chunks // 4):
        p *= 2
    return p


def _compiler_params(num_warps: int, num_stages: int, interpret):
    if interpret:
        return None
    from jax.experimental.pallas import triton as pl_triton

    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------------------------------------------
# In-kernel math on loaded [BT, *] tiles (shared by all kernels; no slicing of values: Triton cannot).
# ----------------------------------------------------------------------------------------------------------------


def _mm(a: jax.Array, b: jax.Array, mode: str, ta: bool = False, tb: bool = False) -> jax.Array:
    """a @ b (a^T if ta, b^T if tb) accumulated in float32, operands rounded as `mode` says."""
    if mode == "bf16":
        a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
        precision = None
    elif mode == "tf32":
        a, b = a.astype(f32), b.astype(f32)
        precision = lax.Precision.DEFAULT
    elif mode == "tf32x3":  # three tf32 passes (a split into hi + lo): ~float32 accuracy on tensor cores
        a, b = a.astype(f32), b.astype(f32)
        cpu = jax.default_backend() == "cpu"  # interpret mode: XLA:CPU has no tf32 algorithm, float32 is exact
        precision = lax.Precision.HIGHEST if cpu else lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    elif mode == "ieee":
        a, b = a.astype(f32), b.astype(f32)
        precision = lax.Precision.HIGHEST
    else:
        raise ValueError(f"unknown dot mode {mode!r}")
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=f32)


def _iota(shape: tuple[int, int], dim: int) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _onehot(shape: tuple[int, int], dim: int, j) -> jax.Array:
    """1.0 where the index along `dim` is j, else 0.0 (float masks: no selects with scalar operands, which the
    Triton lowering of jax 0.11 types wrongly)."""
    return (_iota(shape, dim) == j).astype(f32)


def _put(x: jax.Array, onehot: jax.Array, value: jax.Array) -> jax.Array:
    """x with `value` (broadcast) where `onehot` is 1: an exact blend of finite values."""
    return x * (1.0 - onehot) + value * onehot


def _row(x: jax.Array, j) -> jax.Array:
    """Row j of a [BT, D] tile as [D] (a masked sum: register tiles cannot be sliced in Triton)."""
    return jnp.sum(x * _onehot(x.shape, 0, j), axis=0)


def _col(x: jax.Array, j) -> jax.Array:
    """Column j of a [BT, BT] tile as [BT]."""
    return jnp.sum(x * _onehot(x.shape, 1, j), axis=1)


def _cumsum_rows(g: jax.Array, tril: str | None) -> jax.Array:
    """Inclusive cumsum over rows: a scan (tril None), or a matmul with a lower-triangular ones matrix at the `_mm`
    mode `tril` ("ieee": float32, the TPU kernels; "tf32x3" on GPUs: the ones are exact in tf32 and g's two tf32
    halves keep ~22 bits, so the sum is float32-accurate on tensor cores)."""
    if tril is None:
        return jnp.cumsum(g, axis=0)
    BT = g.shape[0]
    ones = (_iota((BT, BT), 0) >= _iota((BT, BT), 1)).astype(f32)
    return _mm(ones, g, tril)


def chunk_gate_sums(g1: jax.Array, g2: jax.Array, chunk: int) -> jax.Array:
    """Each chunk's gate sum bL per state and key channel, [2, B * H, T / chunk, K] float32, from g1, g2
    [B, T, H, K] (T a multiple of chunk)."""
    B, T, H, K = g1.shape
    sums = [jnp.sum(g.astype(f32).reshape(B, T // chunk, chunk, H, K), axis=2) for g in (g1, g2)]
    return jnp.stack([jnp.swapaxes(x, 1, 2).reshape(B * H, T // chunk, K) for x in sums])


def _gate_sums(g: jax.Array, tril: str | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(b, bL, R): inclusive cumsum [BT, K], its last row [K], the decay range max_K(-bL) (scalar)."""
    b = _cumsum_rows(g, tril)
    bL = jnp.sum(g, axis=0)
    return b, bL, -jnp.min(bL)


def _fast_factors(b: jax.Array, bL: jax.Array, lim: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(exp(d), exp(-d), exp(m)), d = b - m clamped to [-lim, lim], m = bL / 2.

    Within a chunk of decay range R <= 2 lim the clamp is inactive and exp(d) exp(-d') = exp(b_i - b_j) exactly; in
    other chunks the clamp keeps the (discarded) fast-path values finite.
    """
    m = 0.5 * bL
    d = jnp.minimum(jnp.maximum(b - m[None, :], -lim), lim)
    return jnp.exp(d), jnp.exp(-d), jnp.exp(m)


def _exact_trips(R: jax.Array, thresh: float, n: int) -> jax.Array:
    """n if the chunk's decay range exceeds `thresh` (the exact path runs), else 0: the trip count of the exact
    path's loops. Data-dependent loops instead of `lax.cond`: Triton rejects tensor-valued `scf.if` results."""
    return (R > thresh).astype(jnp.int32) * n


def _decay_from(b: jax.Array, j) -> jax.Array:
    """exp(min(b_i - b_j, 0)) for every row i ([BT, K]); rows i < j (clamped to 1) are masked by the callers."""
    return jnp.exp(jnp.minimum(b - _row(b, j)[None, :], 0.0))


def _causal(BT: int) -> jax.Array:
    """[BT, BT] float mask of j <= i."""
    return (_iota((BT, BT), 0) >= _iota((BT, BT), 1)).astype(f32)


def _strict(BT: int) -> jax.Array:
    """[BT, BT] float mask of j < i (the backward leaves the i = j terms to the caller, see `dq_chunk`)."""
    return (_iota((BT, BT), 0) > _iota((BT, BT), 1)).astype(f32)


@dataclasses.dataclass(frozen=True)
class Numerics:
    """Matmul operand precisions ("tf32", "bf16", "ieee") and the fast-path bound of the chunk math."""

    state_dot: str = "tf32"
    intra_dot: str = "tf32"
    thresh: float = THRESH
    tril: str | None = None  # cumsum by a matmul at this `_mm` mode ("ieee" on TPU) instead of a scan (None)


def _decays(b, bL, ef, ei, em, trips):
    """(exp(b), exp(bL - b)) [BT, K]: from the fast factors, recomputed directly when trips == 1 (exact path)."""

    def exact(_, carry):
        return jnp.exp(b), jnp.exp(jnp.minimum(bL[None, :] - b, 0.0))

    return lax.fori_loop(0, trips, exact, (ef * em[None, :], ei * em[None, :]))


def _fwd_terms(q, k, g, nm: Numerics, fast_only: bool = False):
    """Per chunk and state: (q * exp(b), k * exp(bL - b), A masked to j <= i, bL, trips). fast_only: the tensor-core
    path alone (no data-dependent loops; wrong where trips == 1, which the caller then redoes)."""
    BT = q.shape[0]
    b, bL, R = _gate_sums(g, nm.tril)
    ef, ei, em = _fast_factors(b, bL, 0.5 * nm.thresh)
    qf, kf = q * ef, k * ei
    a = _mm(qf, kf, nm.intra_dot, tb=True)  # fast path: exact for R <= thresh
    trips = _exact_trips(R, nm.thresh, 1)
    if fast_only:
        return qf * em[None, :], kf * em[None, :], a * _causal(BT), bL, trips
    eq, ek = _decays(b, bL, ef, ei, em, trips)

    def col(j, a):  # exact path: column j of A, every exponent <= 0
        c = jnp.sum(q * _row(k, j)[None, :] * _decay_from(b, j), axis=1)
        return _put(a, _onehot((BT, BT), 1, j), c[:, None])

    a = lax.fori_loop(0, trips * BT, col, a)
    return q * eq, k * ek, a * _causal(BT), bL, trips


def fwd_chunk(q, k, v, g1, g2, w1, w2, s1, s2, *, scale: float, nm: Numerics):
    """One chunk of the forward for both states.

    Args:
        q, k, g1, g2: [BT, K] float32; v: [BT, BV] float32; w1, w2: mix scalars; s1, s2: [K, BV] entering states.

    Returns:
        o [BT, BV] float32 and the two states after the chunk.
    """
    qd1, kd1, a1, bL1, _ = _fwd_terms(q, k, g1, nm)
    qd2, kd2, a2, bL2, _ = _fwd_terms(q, k, g2, nm)
    o = _mm(qd1 * w1, s1, nm.state_dot) + _mm(qd2 * w2, s2, nm.state_dot)
    o = o + _mm(a1 * w1 + a2 * w2, v, nm.intra_dot)
    s1 = jnp.exp(bL1)[:, None] * s1 + _mm(kd1, v, nm.state_dot, ta=True)
    s2 = jnp.exp(bL2)[:, None] * s2 + _mm(kd2, v, nm.state_dot, ta=True)
    return scale * o, s1, s2


def seg_chunk(x, y, g, s, d, *, reverse: bool, nm: Numerics):
    """One chunk of a segment summary for one state: s <- exp(bL) s + (x * e)^T y, d <- d + bL.

    e = exp(bL - b) forward (x = k, y = v) or exp(b) reverse (x = q, y = do, chunks visited last to first).
    """
    b, bL, _ = _gate_sums(g, nm.tril)
    e = jnp.exp(b) if reverse else jnp.exp(jnp.minimum(bL[None, :] - b, 0.0))
    return jnp.exp(bL)[:, None] * s + _mm(x * e, y, nm.state_dot, ta=True), d + bL


def dq_chunk(q, k, v, do, g, st, *, scale: float, nm: Numerics):
    """One chunk of dq for one state (unweighted by the mix), forward in time, without the j = i terms.

    The i = j terms, scale (do_i . v_i) k_i, carry no decay and are the same for both states; the caller adds them.
    Left out here, q * dq - k * dk (the gate gradient's summand) loses its largest cancelling pair of terms.

    Args:
        q, k, g: [BT, K]; v, do: [BT, V]; st: [K, V] state entering the chunk.

    Returns:
        dq [BT, K] float32 and the state after the chunk.
    """
    BT = q.shape[0]
    b, bL, R = _gate_sums(g, nm.tril)
    da = _mm(do, v, nm.intra_dot, tb=True) * _strict(BT)  # [BT(i), BT(j)] = do_i . v_j, j < i
    ef, ei, em = _fast_factors(b, bL, 0.5 * nm.thresh)
    kf = k * ei
    intra = ef * _mm(da, kf, nm.intra_dot)  # sum_j dA_ij k_j exp(b_i - b_j), fast path
    trips = _exact_trips(R, nm.thresh, 1)
    eq, ek = _decays(b, bL, ef, ei, em, trips)
    intra = intra * (1 - trips).astype(f32)  # the exact path accumulates from zero

    def col(j, acc):
        return acc + _col(da, j)[:, None] * _row(k, j)[None, :] * _decay_from(b, j)

    intra = lax.fori_loop(0, trips * BT, col, intra)
    dq = scale * (_mm(do, st, nm.state_dot, tb=True) * eq + intra)
    return dq, jnp.exp(bL)[:, None] * st + _mm(k * ek, v, nm.state_dot, ta=True)


def dkv_chunk(q, k, v, do, g, ds, *, nm: Numerics):
    """One chunk of dk, dv for one state, backward in time; dk without the i = j terms (see `dq_chunk`).

    Args:
        q, k, g: [BT, K]; v: [BT, V]; do: [BT, V] output gradient times mix weight times scale;
        ds: [K, V] adjoint of the state leaving the chunk.

    Returns:
        dk [BT, K], dv [BT, V] float32 and the adjoint of the state entering the chunk.
    """
    BT = q.shape[0]
    causal = _causal(BT)
    b, bL, R = _gate_sums(g, nm.tril)
    da = _mm(do, v, nm.intra_dot, tb=True) * _strict(BT)  # [BT(i), BT(j)], j < i
    ef, ei, em = _fast_factors(b, bL, 0.5 * nm.thresh)
    qf, kf = q * ef, k * ei
    a = _mm(qf, kf, nm.intra_dot, tb=True)
    dk_intra = ei * _mm(da, qf, nm.intra_dot, ta=True)  # sum_i dA_ij q_i exp(b_i - b_j), fast path
    trips = _exact_trips(R, nm.thresh, 1)
    eq, ek = _decays(b, bL, ef, ei, em, trips)

    def col(j, carry):  # exact path: column j of A and row j of the intra dk, every exponent <= 0
        a, dki = carry
        e = _decay_from(b, j)  # [BT(i), K]
        c = jnp.sum(q * _row(k, j)[None, :] * e, axis=1)
        r = jnp.sum(_col(da, j)[:, None] * q * e, axis=0)  # [K]
        return _put(a, _onehot((BT, BT), 1, j), c[:, None]), _put(dki, _onehot(q.shape, 0, j), r[None, :])

    a, dk_intra = lax.fori_loop(0, trips * BT, col, (a, dk_intra))
    a = a * causal
    dv = _mm(k * ek, ds, nm.state_dot) + _mm(a, do, nm.intra_dot, ta=True)
    dk = _mm(v, ds, nm.state_dot, tb=True) * ek + dk_intra
    return dk, dv, jnp.exp(bL)[:, None] * ds + _mm(q * eq, do, nm.state_dot, ta=True)


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------


def _fwd_kernel(w_ref, q_ref, k_ref, v_ref, g1_ref, g2_ref, sin_ref, o_ref, sout_ref, *, H, BT, BV, NC, P, scale, nm):
    bh, p, iv = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b, h = lax.div(bh, H), lax.rem(bh, H)  # non-negative: no floor-division selects
    vs = pl.ds(iv * BV, BV)
    w1, w2 = w_ref[0], w_ref[1]

    def body(n, carry):
        ts = pl.ds((p * NC + n) * BT, BT)
        o, s1, s2 = fwd_chunk(
            q_ref[b, ts, h, :].astype(f32),  # [BT, K]
            k_ref[b, ts, h, :].astype(f32),  # [BT, K]
            v_ref[b, ts, h, vs].astype(f32),  # [BT, BV]
            g1_ref[b, ts, h, :].astype(f32),
            g2_ref[b, ts, h, :].astype(f32),
            w1,
            w2,
            *carry,
            scale=scale,
            nm=nm,
        )
        o_ref[b, ts, h, vs] = o.astype(o_ref.dtype)
        return s1, s2

    s1, s2 = lax.fori_loop(0, NC, body, (sin_ref[bh, p, 0, :, vs], sin_ref[bh, p, 1, :, vs]))
    # Every segment writes its final state (no `pl.when`: kept free of scf.if); the caller keeps the last.
    sout_ref[bh, p, 0, :, vs] = s1
    sout_ref[bh, p, 1, :, vs] = s2


def _tril(cfg: GpuConfig) -> str | None:
    if cfg.cumsum not in ("scan", "tf32x3", "ieee"):
        raise ValueError(f"GpuConfig.cumsum must be 'scan', 'tf32x3' or 'ieee', got {cfg.cumsum!r}")
    return None if cfg.cumsum == "scan" else cfg.cumsum


def _numerics(cfg: GpuConfig) -> Numerics:
    return Numerics(state_dot=cfg.state_dot, intra_dot=cfg.intra_dot, thresh=cfg.thresh, tril=_tril(cfg))


def _bwd_numerics(cfg: GpuConfig) -> Numerics:
    """The backward's intra-chunk matmuls run at `bwd_dot`, its matmuls with a state at `bwd_state_dot` (None:
    `bwd_dot`). The gate gradient sums per-chunk q * dq - k * dk terms that cancel: with single-pass tf32 (2^-11 per
    operand) everywhere the older (fused) backward left dg at 5e-3 relative error on an H200 (bf16 inputs, gates
    uniform in [-50, 0], T=1000) against the 2e-3 the kernels promise; the split backward passed that test on the
    H200 both with single-pass state matmuls (the default) and with single-pass everywhere."""
    return Numerics(
        state_dot=cfg.bwd_state_dot or cfg.bwd_dot, intra_dot=cfg.bwd_dot, thresh=cfg.thresh, tril=_tril(cfg)
    )


def fwd_gpu(q, k, v, g1, g2, w, s_in, *, scale: float, cfg: GpuConfig, P: int, interpret=False):
    """Outputs and final states given the states entering each segment.

    Args:
        q, k, g1, g2: [B, T, H, K] (T a multiple of P * chunk); v: [B, T, H, V]; w: [2] float32 mix.
        s_in: [B * H, P, 2, K, V] float32 states entering each segment.

    Returns:
        o [B, T, H, V] in q's dtype, each segment's final states [B * H, P, 2, K, V] float32 (the last is the
        sequence's).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT, BV = cfg.chunk, min(cfg.block_v, V)
    NC = T // (P * BT)
    kernel = functools.partial(_fwd_kernel, H=H, BT=BT, BV=BV, NC=NC, P=P, scale=scale, nm=_numerics(cfg))
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((B, T, H, V), q.dtype), jax.ShapeDtypeStruct((B * H, P, 2, K, V), f32)),
        grid=(B * H, P, V // BV),
        compiler_params=_compiler_params(cfg.num_warps, cfg.num_stages, interpret),
        interpret=interpret,
        name="dsla_fwd",
    )(w, q, k, v, g1, g2, s_in)


def _seg_kernel(x_ref, y_ref, g1_ref, g2_ref, s_ref, d_ref, *, H, BT, BV, NC, first, reverse, nm):
    bh, i, iv = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b, h = lax.div(bh, H), lax.rem(bh, H)  # non-negative: no floor-division selects
    p = first + i
    vs = pl.ds(iv * BV, BV)
    K = x_ref.shape[-1]

    def body(n, carry):
        s1, s2, d1, d2 = carry
        ts = pl.ds((p * NC + (NC - 1 - n if reverse else n)) * BT, BT)
        x = x_ref[b, ts, h, :].astype(f32)
        y = y_ref[b, ts, h, vs].astype(f32)
        s1, d1 = seg_chunk(x, y, g1_ref[b, ts, h, :].astype(f32), s1, d1, reverse=reverse, nm=nm)
        s2, d2 = seg_chunk(x, y, g2_ref[b, ts, h, :].astype(f32), s2, d2, reverse=reverse, nm=nm)
        return s1, s2, d1, d2

    z, zk = jnp.zeros((K, BV), f32), jnp.zeros((K,), f32)
    s1, s2, d1, d2 = lax.fori_loop(0, NC, body, (z, z, zk, zk))
    s_ref[bh, i, 0, :, vs] = s1
    s_ref[bh, i, 1, :, vs] = s2
    d_ref[bh, i, iv, 0, :] = d1  # the same for every value tile; the caller keeps tile 0
    d_ref[bh, i, iv, 1, :] = d2


def seg_states_gpu(
    x, y, g1, g2, *, P: int, first: int, count: int, cfg: GpuConfig, reverse: bool = False, interpret=False
):
    """Per-segment state summaries started from zero, for both states.

    Forward (reverse=False, x = k, y = v): S_p = sum over the segment of diag(exp(B_end - B_j)) k_j^T v_j.
    Reverse (reverse=True, x = q, y = do): L_p = sum over the segment of diag(exp(B_i - B_start)) q_i^T do_i, the
    adjoint state at the segment start (before the mix weight and scale).

    Args:
        x, g1, g2: [B, T, H, K]; y: [B, T, H, V]; T a multiple of P * chunk.
        first, count: the segments first .. first + count - 1 are summarised.

    Returns:
        summaries [B * H, count, 2, K, V] float32 and total log decays [B * H, count, 2, K] float32.
    """
    B, T, H, K = x.shape
    V = y.shape[-1]
    BT, BV = cfg.chunk, min(cfg.block_v, V)
    NC = T // (P * BT)
    nm = _bwd_numerics(cfg) if reverse else _numerics(cfg)
    kernel = functools.partial(_seg_kernel, H=H, BT=BT, BV=BV, NC=NC, first=first, reverse=reverse, nm=nm)
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((B * H, count, 2, K, V), f32),
            jax.ShapeDtypeStruct((B * H, count, V // BV, 2, K), f32),
        ),
        grid=(B * H, count, V // BV),
        compiler_params=_compiler_params(cfg.num_warps, cfg.num_stages, interpret),
        interpret=interpret,
        name="dsla_seg_states_rev" if reverse else "dsla_seg_states",
    )(x, y, g1, g2)


# ----------------------------------------------------------------------------------------------------------------
# Split forward (v5): a parallel intra-chunk kernel, a segment pass and a recurrent kernel of loads and matmuls
# ----------------------------------------------------------------------------------------------------------------

# GpuConfig.split_dtype -> storage dtypes of (qd, kd). "kd-bf16x2": kd as two bfloat16 planes per state (hi, lo:
# [4, B H, T, K], plane 2 s + i) whose float32 sum is kd to ~2^-16, and qd rounded to tf32 (to nearest): the
# operands of the Mosaic GPU recurrent kernel's WGMMAs (`pallas_gpu_rec_mgpu`), written by the intra kernel.
# "qkd-bf16x2": qd as halves too, the same planes (what the paired recurrent kernel reads: `GpuConfig.rec_pair`,
# which sets it; not meant to be set by hand).
SPLIT_DTYPES = {
    "float32": (f32, f32),
    "bfloat16": (jnp.bfloat16, jnp.bfloat16),
    "kd-bfloat16": (f32, jnp.bfloat16),
    "kd-bf16x2": (f32, jnp.bfloat16),
    "qkd-bf16x2": (jnp.bfloat16, jnp.bfloat16),
}
KD_HALVES = ("kd-bf16x2", "qkd-bf16x2")  # the split dtypes that store kd as halves (what the Mosaic kernels read)


def round_tf32(x: jax.Array) -> jax.Array:
    """float32 x rounded to tf32 (10 mantissa bits), to nearest (ties away from zero), kept in float32: tensor
    cores read tf32 operands by dropping the low 13 bits, a bias this removes."""
    u = lax.bitcast_convert_type(x, jnp.int32)
    return lax.bitcast_convert_type((u + 4096) & -8192, f32)


def _kd_tile(kd_ref, s, idx):
    """State s's decayed keys at idx (bh, tokens, keys) in float32, from one plane or a hi / lo pair."""
    if kd_ref.shape[0] == 4:
        return kd_ref[2 * s, *idx].astype(f32) + kd_ref[2 * s + 1, *idx].astype(f32)
    return kd_ref[s, *idx]


def _intra_kernel(w_ref, q_ref, k_ref, v_ref, g1_ref, g2_ref, *refs, H, BT, BK, scale, nm, mode, decayed, scores):
    """mode "inline": both paths in one kernel (the exact one a loop of 0 or 1 trips per key tile and state);
    "fast": the fast path only, plus a flag per chunk (1 where any key tile of either state exceeds the decay
    bound); "fixup": flagged chunks redo everything inline, in place (outputs aliased), the rest read their flag.
    Outputs: (qd, kd, ebl if decayed), o_intra, (A if scores), (flag if mode "fast")."""
    if mode == "fixup":
        flag_ref, *refs = refs
        refs = refs[len(refs) // 2 :]  # (the aliased inputs, then the outputs)
    qd_ref, kd_ref, ebl_ref = refs[:3] if decayed else (None, None, None)
    refs = refs[3:] if decayed else refs
    oi_ref, *refs = refs
    a_ref = refs.pop(0) if scores else None
    out_flag = refs
    bh, n = pl.program_id(0), pl.program_id(1)
    b, h = lax.div(bh, H), lax.rem(bh, H)  # non-negative: no floor-division selects
    ts = pl.ds(n * BT, BT)
    w1, w2 = w_ref[0] * scale, w_ref[1] * scale

    def ktile(ik, carry):  # one key tile: its decayed q / k stored at once, its share of the mixed scores summed
        a, flag = carry
        ks = pl.ds(ik * BK, BK)
        q = q_ref[b, ts, h, ks].astype(f32)  # [BT, BK]
        k = k_ref[b, ts, h, ks].astype(f32)
        for s, (g_ref, w) in enumerate(((g1_ref, w1), (g2_ref, w2))):
            qd, kd, a_s, bL, trips = _fwd_terms(q, k, g_ref[b, ts, h, ks].astype(f32), nm, mode == "fast")
            if decayed and kd_ref.shape[0] == 4:  # "kd-bf16x2", "qkd-bf16x2"
                if qd_ref.shape[0] == 4:  # "qkd-bf16x2": qd's halves too (the paired recurrent kernel's operand)
                    qd_ref[2 * s, bh, ts, ks], qd_ref[2 * s + 1, bh, ts, ks] = halves(qd * w, qd_ref.dtype)
                else:
                    qd_ref[s, bh, ts, ks] = round_tf32(qd * w)
                kd_ref[2 * s, bh, ts, ks], kd_ref[2 * s + 1, bh, ts, ks] = halves(kd, kd_ref.dtype)
            elif decayed:
                qd_ref[s, bh, ts, ks] = (qd * w).astype(qd_ref.dtype)
                kd_ref[s, bh, ts, ks] = kd.astype(kd_ref.dtype)
            if decayed:
                ebl_ref[s, bh, n, ks] = jnp.exp(bL)
            a = a + a_s * w
            flag = jnp.maximum(flag, trips.astype(f32))
        return a, flag

    def chunk(_, carry):
        a, flag = lax.fori_loop(0, q_ref.shape[-1] // BK, ktile, (jnp.zeros((BT, BT), f32), jnp.float32(0.0)))
        if scores:
            a_ref[bh, ts, :] = a  # for the backward's dv (`pallas_gpu_bwd`)
        oi_ref[bh, ts, :] = _mm(a, v_ref[b, ts, h, :].astype(f32), nm.intra_dot)  # [BT, V]
        if out_flag:
            out_flag[0][bh, n] = flag
        return carry

    if mode == "fixup":  # a loop of 0 or 1 trips: Triton has no tensor-valued conditionals
        lax.fori_loop(0, flag_ref[bh, n].astype(jnp.int32), chunk, 0)
    else:
        chunk(0, 0)


def fwd_intra_gpu(
    q, k, v, g1, g2, w, *, scale: float, cfg: GpuConfig, interpret=False, decayed: bool = True, scores: bool = True
):
    """Everything of the forward that does not depend on the carried states, for every chunk in parallel.

    Per chunk and state s (b its chunk-local inclusive gate cumsum, bL the last row): the intra-chunk scores by the
    fast / exact paths of `_fwd_terms` (the same numerics as the fused kernel), mixed and applied to v. A loop over
    key tiles (`intra_block_k`; each takes its own path) keeps the live tiles small: with whole [BT, K] tiles the kernel
    used 255 registers and spilled 2.9 GB per call at B1 T8192 on an H200. With `cfg.fwd_fixup` (the default) the
    kernel runs the fast path alone and flags chunks whose decay range exceeds the bound in any key tile; a second
    launch ("dsla_fwd_exact", outputs aliased) redoes only the flagged chunks with both paths, so the exact path's
    loops hold no registers in the hot kernel (1.79 -> 1.65 ms at B1 T8192 on an H200).

    Args:
        q, k, g1, g2: [B, T, H, K] (T a multiple of chunk); v: [B, T, H, V]; w: [2] float32 mix.

    Returns:
        qd [2, B * H, T, K] = scale * w_s * q * exp(b_s), kd [2, B * H, T, K] = k * exp(bL_s - b_s) (both in
        `cfg.split_dtype`), ebl [2, B * H, N, K] = exp(bL_s), o_intra [B * H, T, V] = scale * sum_s w_s A_s v and
        the mixed scores themselves, A [B * H, T, chunk] = scale * sum_s w_s A_s (row i of a chunk, masked to
        j <= i; float32, a residual for the backward), N = T / chunk. Heads-major: the recurrent kernel reads
        contiguous [BT, *] blocks. Without `decayed` the first three are left out (the one-pass forward,
        `pallas_gpu_onepass`, recomputes them), without `scores` A.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT = cfg.chunk
    N = T // BT
    qdt, kdt = SPLIT_DTYPES[cfg.split_dtype]
    BK = min(cfg.intra_block_k or cfg.block_k, K)
    kw = dict(H=H, BT=BT, BK=BK, scale=scale, nm=_numerics(cfg), decayed=decayed, scores=scores)
    out_shape = (
        jax.ShapeDtypeStruct((4 if cfg.split_dtype == "qkd-bf16x2" else 2, B * H, T, K), qdt),
        jax.ShapeDtypeStruct((4 if cfg.split_dtype in KD_HALVES else 2, B * H, T, K), kdt),
        jax.ShapeDtypeStruct((2, B * H, N, K), f32),
        jax.ShapeDtypeStruct((B * H, T, V), f32),
        jax.ShapeDtypeStruct((B * H, T, BT), f32),
    )
    out_shape = (out_shape[:3] if decayed else ()) + out_shape[3:4] + (out_shape[4:] if scores else ())
    params = _compiler_params(cfg.intra_num_warps, cfg.intra_num_stages, interpret)
    if not cfg.fwd_fixup:
        return pl.pallas_call(
            functools.partial(_intra_kernel, mode="inline", **kw),
            out_shape=out_shape,
            grid=(B * H, N),
            compiler_params=params,
            interpret=interpret,
            name="dsla_fwd_intra",
        )(w, q, k, v, g1, g2)
    *outs, flags = pl.pallas_call(
        functools.partial(_intra_kernel, mode="fast", **kw),
        out_shape=out_shape + (jax.ShapeDtypeStruct((B * H, N), f32),),
        grid=(B * H, N),
        compiler_params=params,
        interpret=interpret,
        name="dsla_fwd_intra",
    )(w, q, k, v, g1, g2)
    return fwd_intra_fixup_gpu(
        q, k, v, g1, g2, w, flags, outs, scale=scale, cfg=cfg, interpret=interpret, decayed=decayed, scores=scores
    )


def fwd_intra_fixup_gpu(
    q, k, v, g1, g2, w, flags, outs, *, scale: float, cfg: GpuConfig, interpret=False, decayed=True, scores=True
):
    """The fix-up launch of `fwd_intra_gpu` ("dsla_fwd_exact"): the chunks flagged 1.0 in flags [B * H, N] float32
    redo every output with both paths (the exact one where their decay range needs it), in place; the others keep
    `outs`, the fast path's outputs in `fwd_intra_gpu`'s order (aliased: nothing else is written)."""
    B, T, H, K = q.shape
    BK = min(cfg.intra_block_k or cfg.block_k, K)
    kw = dict(H=H, BT=cfg.chunk, scale=scale, nm=_numerics(cfg), decayed=decayed, scores=scores)
    out_shape = tuple(jax.ShapeDtypeStruct(o.shape, o.dtype) for o in outs)
    return pl.pallas_call(  # the exact path where a chunk's decay range needs it, in place
        functools.partial(_intra_kernel, mode="fixup", BK=min(cfg.exact_block_k or BK, K), **kw),
        out_shape=out_shape,
        grid=(B * H, T // cfg.chunk),
        input_output_aliases={7 + i: i for i in range(len(out_shape))},
        compiler_params=_compiler_params(cfg.intra_num_warps, cfg.intra_num_stages, interpret),
        interpret=interpret,
        name="dsla_fwd_exact",
    )(w, q, k, v, g1, g2, flags, *outs)


def _rec_kernel(qd_ref, kd_ref, ebl_ref, v_ref, oi_ref, sin_ref, o_ref, sout_ref, *hs_ref, H, BT, BV, NC, sd):
    iv, bh, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)  # value tiles adjacent: L2 reuse
    b, h = lax.div(bh, H), lax.rem(bh, H)  # non-negative: no floor-division selects
    vs = pl.ds(iv * BV, BV)

    def body(n, carry):  # loads and four matmuls; no exponentials
        s1, s2 = carry
        c = p * NC + n
        ts = pl.ds(c * BT, BT)
        if hs_ref:  # the states entering every chunk, for the backward (`GpuConfig.save_states`)
            hs_ref[0][0, bh, c, :, vs] = s1
            hs_ref[0][1, bh, c, :, vs] = s2
        v = v_ref[b, ts, h, vs].astype(f32)  # [BT, BV]
        o = oi_ref[bh, ts, vs] + _mm(qd_ref[0, bh, ts, :], s1, sd) + _mm(qd_ref[1, bh, ts, :], s2, sd)
        o_ref[b, ts, h, vs] = o.astype(o_ref.dtype)
        s1 = ebl_ref[0, bh, c, :][:, None] * s1 + _mm(_kd_tile(kd_ref, 0, (bh, ts, slice(None))), v, sd, ta=True)
        s2 = ebl_ref[1, bh, c, :][:, None] * s2 + _mm(_kd_tile(kd_ref, 1, (bh, ts, slice(None))), v, sd, ta=True)
        return s1, s2

    s1, s2 = lax.fori_loop(0, NC, body, (sin_ref[bh, p, 0, :, vs], sin_ref[bh, p, 1, :, vs]))
    sout_ref[bh, p, 0, :, vs] = s1  # every segment writes (no `pl.when`); the caller keeps the last
    sout_ref[bh, p, 1, :, vs] = s2


def fwd_rec_gpu(qd, kd, ebl, v, oi, s_in, *, cfg: GpuConfig, P: int, interpret=False, save_states: bool = False):
    """The state recurrence of the split forward: per chunk o = o_intra + qd_1 S_1 + qd_2 S_2 and
    S_s <- diag(exp(bL_s)) S_s + kd_s^T v, from the states entering each segment (all segments in parallel).

    Args:
        qd, kd, ebl, oi: `fwd_intra_gpu`'s outputs; v: [B, T, H, V]; s_in: [B * H, P, 2, K, V] float32.
        save_states: also return the states entering every chunk [2, B * H, N, K, V] float32 (what the split
            backward's state pass would recompute; 4 K V bytes per state and chunk).

    Returns:
        o [B, T, H, V] in v's dtype, each segment's final states [B * H, P, 2, K, V] float32 (and the chunk states).
    """
    B, T, H, V = v.shape
    K = qd.shape[-1]
    BT, BV = cfg.chunk, min(cfg.block_v, V)
    NC = T // (P * BT)
    kernel = functools.partial(_rec_kernel, H=H, BT=BT, BV=BV, NC=NC, sd=cfg.state_dot)
    out_shape = (jax.ShapeDtypeStruct((B, T, H, V), v.dtype), jax.ShapeDtypeStruct((B * H, P, 2, K, V), f32))
    if save_states:
        out_shape += (jax.ShapeDtypeStruct((2, B * H, T // BT, K, V), f32),)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(V // BV, B * H, P),
        compiler_params=_compiler_params(cfg.rec_num_warps, cfg.rec_num_stages, interpret),
        interpret=interpret,
        name="dsla_fwd_rec",
    )(qd, kd, ebl, v, oi, s_in)


def _seg_split_kernel(kd_ref, ebl_ref, v_ref, s_ref, d_ref, *, H, BT, BK, BV, NC, sd):
    kv, bh, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)  # a segment's tiles adjacent: L2 reuse
    nv = v_ref.shape[-1] // BV
    ik, iv = lax.div(kv, nv), lax.rem(kv, nv)  # (key tile, value tile), value tiles fastest
    b, h = lax.div(bh, H), lax.rem(bh, H)  # non-negative: no floor-division selects
    ks, vs = pl.ds(ik * BK, BK), pl.ds(iv * BV, BV)

    def body(n, carry):  # the state rows of a key tile are a recurrence of their own
        s1, s2, d1, d2 = carry
        c = p * NC + n
        ts = pl.ds(c * BT, BT)
        v = v_ref[b, ts, h, vs].astype(f32)
        e1, e2 = ebl_ref[0, bh, c, ks], ebl_ref[1, bh, c, ks]
        s1 = e1[:, None] * s1 + _mm(_kd_tile(kd_ref, 0, (bh, ts, ks)), v, sd, ta=True)
        s2 = e2[:, None] * s2 + _mm(_kd_tile(kd_ref, 1, (bh, ts, ks)), v, sd, ta=True)
        return s1, s2, d1 * e1, d2 * e2

    z, one = jnp.zeros((BK, BV), f32), jnp.ones((BK,), f32)
    s1, s2, d1, d2 = lax.fori_loop(0, NC, body, (z, z, one, one))
    s_ref[bh, p, 0, ks, vs] = s1
    s_ref[bh, p, 1, ks, vs] = s2
    d_ref[bh, p, iv, 0, ks] = d1  # the same for every value tile; the caller keeps tile 0
    d_ref[bh, p, iv, 1, ks] = d2


def seg_states_split_gpu(kd, ebl, v, *, P: int, count: int, cfg: GpuConfig, interpret=False):
    """Per-segment state summaries from zero for segments 0 .. count - 1, from `fwd_intra_gpu`'s kd and ebl.

    Returns:
        summaries [B * H, count, 2, K, V] and total decays (products of exp(bL), not logs) [B * H, count, nv, 2, K],
        both float32 (nv = V / BV value tiles, all equal).
    """
    B, T, H, V = v.shape
    K = kd.shape[-1]
    BT, BV, BK = cfg.chunk, min(cfg.block_v, V), min(cfg.seg_block_k or K, K)
    NC = T // (P * BT)
    kernel = functools.partial(_seg_split_kernel, H=H, BT=BT, BK=BK, BV=BV, NC=NC, sd=cfg.state_dot)
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((B * H, count, 2, K, V), f32),
            jax.ShapeDtypeStruct((B * H, count, V // BV, 2, K), f32),
        ),
        grid=((K // BK) * (V // BV), B * H, count),
        compiler_params=_compiler_params(cfg.seg_num_warps or cfg.rec_num_warps, cfg.rec_num_stages, interpret),
        interpret=interpret,
        name="dsla_seg_states_split",
    )(kd, ebl, v)


# ----------------------------------------------------------------------------------------------------------------
# Backward (one state per program, full [K, V] carry; gates stacked as [2, B, T, H, K])
# ----------------------------------------------------------------------------------------------------------------


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, g_ref, sin_ref, dq_ref, sc_ref, *, H, BT, NC, scale, nm):
    bh, s, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b, h = lax.div(bh, H), lax.rem(bh, H)  # non-negative: no floor-division selects

    def body(n, st):
        ts = pl.ds((p * NC + n) * BT, BT)
        sc_ref[s, bh, p * NC + n] = st  # the state entering the chunk, for the gate gradient (`bwd_dkv_gpu`)
        dq, st = dq_chunk(
            q_ref[b, ts, h, :].astype(f32),
            k_ref[b, ts, h, :].astype(f32),
            v_ref[b, ts, h, :].astype(f32),
            do_ref[b, ts, h, :].astype(f32),
            g_ref[s, b, ts, h, :].astype(f32),
            st,
            scale=scale,
            nm=nm,
        )
        dq_ref[s, b, ts, h, :] = dq
        return st

    lax.fori_loop(0, NC, body, sin_ref[bh, p, s])


def bwd_dq_gpu(q, k, v, do, g, s_in, *, scale: float, cfg: GpuConfig, P: int, interpret=False):
    """dq per state (unweighted by the mix, without the j = i terms) and the state entering every chunk.

    Args:
        q, k: [B, T, H, K]; v, do: [B, T, H, V]; g: [2, B, T, H, K] stacked gates;
        s_in: [B * H, P, 2, K, V] float32 states entering each segment (saved by the forward).

    Returns:
        dq [2, B, T, H, K] and chunk states [2, B * H, N, K, V] (N = T / bwd_chunk), float32.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT = cfg.bwd_chunk
    NC = T // (P * BT)
    kernel = functools.partial(_dq_kernel, H=H, BT=BT, NC=NC, scale=scale, nm=_bwd_numerics(cfg))
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((2, B, T, H, K), f32),
            jax.ShapeDtypeStruct((2, B * H, T // BT, K, V), f32),
        ),
        grid=(B * H, 2, P),
        compiler_params=_compiler_params(cfg.bwd_num_warps, cfg.bwd_num_stages, interpret),
        interpret=interpret,
        name="dsla_bwd_dq",
    )(q, k, v, do, g, s_in)


def _dkv_kernel(
    w_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    g_ref,
    dsend_ref,
    sc_ref,
    dk_ref,
    dv_ref,
    dh0_ref,
    c_ref,
    *,
    H,
    BT,
    NC,
    scale,
    nm,
):
    bh, s, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b, h = lax.div(bh, H), lax.rem(bh, H)  # non-negative: no floor-division selects
    sf = s.astype(f32)
    ws = (w_ref[0] * (1.0 - sf) + w_ref[1] * sf) * scale

    def body(n, ds):
        c = p * NC + NC - 1 - n
        ts = pl.ds(c * BT, BT)
        dk, dv, ds = dkv_chunk(
            q_ref[b, ts, h, :].astype(f32),
            k_ref[b, ts, h, :].astype(f32),
            v_ref[b, ts, h, :].astype(f32),
            do_ref[b, ts, h, :].astype(f32) * ws,
            g_ref[s, b, ts, h, :].astype(f32),
            ds,
            nm=nm,
        )
        dk_ref[s, b, ts, h, :] = dk
        dv_ref[s, b, ts, h, :] = dv
        # The gate gradient at the chunk's first token: sum_V S_in * dS_in (no cancellation, see `pallas.py`).
        c_ref[s, bh, c, 0, :] = jnp.sum(sc_ref[s, bh, c] * ds, axis=1)
        return ds

    ds = lax.fori_loop(0, NC, body, dsend_ref[bh, p, s])
    dh0_ref[bh, p, s] = ds  # the adjoint at each segment's start; segment 0's is the initial-state gradient


def bwd_dkv_gpu(w, q, k, v, do, g, ds_end, s_chunks, *, scale: float, cfg: GpuConfig, P: int, interpret=False):
    """dk (without the i = j terms), dv per state (weighted by the mix), initial-state and chunk-boundary gradients.

    Args:
        w: [2] float32 mix; q, k: [B, T, H, K]; v, do: [B, T, H, V]; g: [2, B, T, H, K] stacked gates;
        ds_end: [B * H, P, 2, K, V] float32 adjoint states at the end of each segment;
        s_chunks: [2, B * H, N, K, V] float32 states entering every chunk (from `bwd_dq_gpu`).

    Returns:
        dk [2, B, T, H, K], dv [2, B, T, H, V] (float32, per state), the adjoints at the segment starts
        [B * H, P, 2, K, V] (segment 0's is the initial-state gradient) and the gate gradient at every chunk's
        first token, sum_V S_in * dS_in, [2, B * H, N, 1, K].
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT = cfg.bwd_chunk
    NC = T // (P * BT)
    kernel = functools.partial(_dkv_kernel, H=H, BT=BT, NC=NC, scale=scale, nm=_bwd_numerics(cfg))
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((2, B, T, H, K), f32),
            jax.ShapeDtypeStruct((2, B, T, H, V), f32),
            jax.ShapeDtypeStruct((B * H, P, 2, K, V), f32),
            jax.ShapeDtypeStruct((2, B * H, T // BT, 1, K), f32),
        ),
        grid=(B * H, 2, P),
        compiler_params=_compiler_params(cfg.bwd_num_warps, cfg.bwd_num_stages, interpret),
        interpret=interpret,
        name="dsla_bwd_dkv",
    )(w, q, k, v, do, g, ds_end, s_chunks)
