"""DSLA Pallas kernels for TPUs (Mosaic TPU): chunked forward, dq and dk/dv backward.

The chunk math is the GPU kernels' (`pallas_gpu.fwd_chunk`, `dq_chunk`, `dkv_chunk`), run one chunk per grid step:
the grid is (B, H, [state or value tile], N chunks) with the chunk axis last and "arbitrary", and the carried state
lives in a VMEM scratch buffer, set from the initial state at the first chunk and written out at the last. Tiles are
[BT, K] / [BT, V] blocks of a heads-major [B, H, T, D] layout (the caller's [B, T, H, D] is transposed), so every
block's last two dimensions are (a multiple of 8, K or V) and respect the (8, 128) tiling. The in-chunk cumsum is a
float32 matmul with a lower-triangular ones matrix (`Numerics.tril`).

Only interpret-mode runs (`interpret=pltpu.InterpretParams()`) are tested here: no TPU was at hand.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dsla_jax.ops.dsla.pallas_gpu import THRESH, Numerics, dkv_chunk, dq_chunk, fwd_chunk

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """Static choices of the TPU kernels.

    Attributes:
        chunk: BT, tokens per chunk (a multiple of 8; 64 or 128 suit the MXU).
        state_dot, intra_dot: matmul operand precisions ("ieee" = float32 at HIGHEST, "bf16").
        thresh: decay range bound of the fast intra-chunk path (see `pallas_gpu`).
    """

    chunk: int = 64
    state_dot: str = "ieee"
    intra_dot: str = "ieee"
    thresh: float = THRESH


def _numerics(cfg: TpuConfig) -> Numerics:
    return Numerics(state_dot=cfg.state_dot, intra_dot=cfg.intra_dot, thresh=cfg.thresh, tril="ieee")


def _params(interpret, n_parallel: int):
    if interpret:
        return None
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_parallel + ("arbitrary",))


def _heads_major(x: jax.Array) -> jax.Array:
    """[B, T, H, D] -> [B, H, T, D] (and back: the permutation is its own inverse)."""
    return jnp.swapaxes(x, 1, 2)


def _fwd_kernel(w_ref, q_ref, k_ref, v_ref, g1_ref, g2_ref, h0_ref, o_ref, sT_ref, s1_scr, s2_scr, *, scale, nm):
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        s1_scr[...] = h0_ref[0]
        s2_scr[...] = h0_ref[1]

    o, s1, s2 = fwd_chunk(
        q_ref[...].astype(f32),
        k_ref[...].astype(f32),
        v_ref[...].astype(f32),
        g1_ref[...].astype(f32),
        g2_ref[...].astype(f32),
        w_ref[0],
        w_ref[1],
        s1_scr[...],
        s2_scr[...],
        scale=scale,
        nm=nm,
    )
    o_ref[...] = o.astype(o_ref.dtype)
    s1_scr[...] = s1
    s2_scr[...] = s2

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        sT_ref[0] = s1
        sT_ref[1] = s2


def fwd_tpu(q, k, v, g1, g2, w, h0, *, scale: float, cfg: TpuConfig, interpret=False):
    """Forward over the padded, head-expanded problem.

    Args:
        q, k, g1, g2: [B, T, H, K] (T a multiple of the chunk); v: [B, T, H, V]; w: [2] float32;
        h0: [B * H, 2, K, V] float32 initial states.

    Returns:
        o [B, T, H, V] in q's dtype and the final states [B * H, 2, K, V] float32.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT = cfg.chunk
    N = T // BT
    qk = pl.BlockSpec((None, None, BT, K), lambda bh, iv, n: (bh // H, bh % H, n, 0))
    vo = pl.BlockSpec((None, None, BT, V), lambda bh, iv, n: (bh // H, bh % H, n, 0))
    st = pl.BlockSpec((None, 2, K, V), lambda bh, iv, n: (bh, 0, 0, 0))
    o, s_T = pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, nm=_numerics(cfg)),
        out_shape=(jax.ShapeDtypeStruct((B, H, T, V), q.dtype), jax.ShapeDtypeStruct((B * H, 2, K, V), f32)),
        grid=(B * H, 1, N),
        in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM), qk, qk, vo, qk, qk, st],
        out_specs=(vo, st),
        scratch_shapes=[pltpu.VMEM((K, V), f32), pltpu.VMEM((K, V), f32)],
        compiler_params=_params(interpret, 2),
        interpret=interpret,
        name="dsla_fwd_tpu",
    )(w, *(_heads_major(x) for x in (q, k, v, g1, g2)), h0)
    return _heads_major(o), s_T


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, g_ref, h0_ref, dq_ref, sc_ref, st_scr, *, scale, nm):
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        st_scr[...] = h0_ref[...]

    sc_ref[...] = st_scr[...]  # the state entering the chunk, for the gate gradient
    dq, st = dq_chunk(
        q_ref[...].astype(f32),
        k_ref[...].astype(f32),
        v_ref[...].astype(f32),
        do_ref[...].astype(f32),
        g_ref[...].astype(f32),
        st_scr[...],
        scale=scale,
        nm=nm,
    )
    dq_ref[...] = dq
    st_scr[...] = st


def _dkv_kernel(
    w_ref, q_ref, k_ref, v_ref, do_ref, g_ref, dsT_ref, sc_ref, dk_ref, dv_ref, dh0_ref, c_ref, ds_scr, *, scale, nm
):
    s, n = pl.program_id(1), pl.program_id(2)

    @pl.when(n == 0)
    def _():
        ds_scr[...] = dsT_ref[...]

    sf = s.astype(f32)
    ws = (w_ref[0] * (1.0 - sf) + w_ref[1] * sf) * scale
    dk, dv, ds = dkv_chunk(
        q_ref[...].astype(f32),
        k_ref[...].astype(f32),
        v_ref[...].astype(f32),
        do_ref[...].astype(f32) * ws,
        g_ref[...].astype(f32),
        ds_scr[...],
        nm=nm,
    )
    dk_ref[...] = dk
    dv_ref[...] = dv
    ds_scr[...] = ds
    c_ref[...] = jnp.sum(sc_ref[...] * ds, axis=1)[None, :]  # sum_V S_in * dS_in at the chunk's first token

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        dh0_ref[...] = ds


def bwd_tpu(res, do, ds_T, *, scale: float, cfg: TpuConfig, interpret=False):
    """Backward of `fwd_tpu`: per-state dq (unweighted), dk and dv (weighted), and dh0.

    Args:
        res: the forward's residuals (q, k, v, g1, g2, w, h0, s_T); do: [B, T, H, V]; ds_T: [B * H, 2, K, V].

    Returns:
        dq_s, dk_s [2, B, T, H, K] (without the i = j terms), dv_s [2, B, T, H, V] float32, dh0 [B * H, 2, K, V]
        and the gate gradients at the chunk starts [2, B * H, N, 1, K] (see `pallas_gpu.bwd_dkv_gpu`).
    """
    q, k, v, g1, g2, w, h0, _ = res
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT = cfg.chunk
    N = T // BT
    nm = _numerics(cfg)
    qh, kh, vh, doh = (_heads_major(x) for x in (q, k, v, do))
    gh = jnp.stack([_heads_major(g1), _heads_major(g2)])  # [2, B, H, T, K]

    def fwd_idx(bh, s, n):
        return (bh // H, bh % H, n, 0)

    def rev_idx(bh, s, n):
        return (bh // H, bh % H, N - 1 - n, 0)

    def specs(idx):
        qk = pl.BlockSpec((None, None, BT, K), idx)
        vo = pl.BlockSpec((None, None, BT, V), idx)
        gs = pl.BlockSpec((None, None, None, BT, K), lambda bh, s, n: (s, *idx(bh, s, n)))
        ps = pl.BlockSpec((None, None, None, BT, V), lambda bh, s, n: (s, *idx(bh, s, n)))
        return qk, vo, gs, ps

    state = pl.BlockSpec((None, None, K, V), lambda bh, s, n: (bh, s, 0, 0))
    chunk_state = pl.BlockSpec((None, None, None, K, V), lambda bh, s, n: (s, bh, n, 0, 0))
    chunk_state_rev = pl.BlockSpec((None, None, None, K, V), lambda bh, s, n: (s, bh, N - 1 - n, 0, 0))
    chunk_c_rev = pl.BlockSpec((None, None, None, 1, K), lambda bh, s, n: (s, bh, N - 1 - n, 0, 0))
    qk, vo, gs, _ = specs(fwd_idx)
    dq_s, s_chunks = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, nm=nm),
        out_shape=(jax.ShapeDtypeStruct((2, B, H, T, K), f32), jax.ShapeDtypeStruct((2, B * H, N, K, V), f32)),
        grid=(B * H, 2, N),
        in_specs=[qk, qk, vo, vo, gs, state],
        out_specs=(gs, chunk_state),
        scratch_shapes=[pltpu.VMEM((K, V), f32)],
        compiler_params=_params(interpret, 2),
        interpret=interpret,
        name="dsla_bwd_dq_tpu",
    )(qh, kh, vh, doh, gh, h0)

    qk, vo, gs, ps = specs(rev_idx)
    dk_s, dv_s, dh0, c = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, nm=nm),
        out_shape=(
            jax.ShapeDtypeStruct((2, B, H, T, K), f32),
            jax.ShapeDtypeStruct((2, B, H, T, V), f32),
            jax.ShapeDtypeStruct((B * H, 2, K, V), f32),
            jax.ShapeDtypeStruct((2, B * H, N, 1, K), f32),
        ),
        grid=(B * H, 2, N),
        in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM), qk, qk, vo, vo, gs, state, chunk_state_rev],
        out_specs=(gs, ps, state, chunk_c_rev),
        scratch_shapes=[pltpu.VMEM((K, V), f32)],
        compiler_params=_params(interpret, 2),
        interpret=interpret,
        name="dsla_bwd_dkv_tpu",
    )(w, qh, kh, vh, doh, gh, ds_T, s_chunks)
    back = functools.partial(jnp.swapaxes, axis1=2, axis2=3)
    return back(dq_s), back(dk_s), back(dv_s), dh0, c
