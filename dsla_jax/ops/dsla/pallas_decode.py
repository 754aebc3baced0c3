"""DSLA decode step as one Pallas kernel (GPU: Triton lowering; TPU: Mosaic): both states read once, updated,
read out and written once.

Per program (batch b, kv head, value tile of BV columns):
    S_s' = diag(exp(g_s)) S_s + k^T v            (s = 1, 2; [K, BV] float32 tiles)
    o_g  = scale * (w_1 q_g S_1' + w_2 q_g S_2')  for the G query heads of the kv head.
Decode is bandwidth-bound: 2 states x (read + write) x 4 bytes x K x V per head and token, the rest is negligible.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

f32 = jnp.float32


def _decode_kernel(w_ref, q_ref, k_ref, v_ref, g1_ref, g2_ref, s1_ref, s2_ref, o_ref, s1o_ref, s2o_ref, *, scale, G):
    k = jnp.transpose(k_ref[...].astype(f32))  # [K, 1]
    v = v_ref[...].astype(f32)  # [1, BV]
    kv = k * v  # [K, BV]
    s1 = jnp.exp(jnp.transpose(g1_ref[...].astype(f32))) * s1_ref[...] + kv
    s2 = jnp.exp(jnp.transpose(g2_ref[...].astype(f32))) * s2_ref[...] + kv
    s1o_ref[...] = s1
    s2o_ref[...] = s2
    s = w_ref[0] * s1 + w_ref[1] * s2  # [K, BV]: the read-out is linear in the state
    q = q_ref[...].astype(f32)  # [G, K]
    if G == 1:
        o = jnp.sum(jnp.transpose(q) * s, axis=0, keepdims=True)  # [1, BV]
    else:
        o = jnp.zeros((G, s.shape[1]), f32)
        for g in range(G):  # G is small; rows of q by masked sums (no value slicing in Triton), float masks
            qg = jnp.sum(q * (lax.broadcasted_iota(jnp.int32, q.shape, 0) == g).astype(f32), axis=0)
            og = jnp.sum(qg[:, None] * s, axis=0)
            o = o + og[None, :] * (lax.broadcasted_iota(jnp.int32, o.shape, 0) == g).astype(f32)
    o_ref[...] = (scale * o).astype(o_ref.dtype)


def decode_step(
    q, k, v, g1, g2, w, s1, s2, *, scale: float, backend: str, interpret=False, block_v=None, num_warps: int = 8
):
    """One decode step of both states (no shape checks: `pallas.dsla_decode_step_pallas` validates).

    Args:
        q: [B, H, K]; k, g1, g2: [B, Hk, K]; v: [B, Hk, V]; w: [2] float32; s1, s2: [B, Hk, K, V] float32.
        backend: "gpu" or "tpu" (block shapes and compiler parameters); interpret: run in the Pallas interpreter.
        block_v: BV, value columns per program (default 64 on GPU, V on TPU).

    Returns:
        o [B, H, V] in q's dtype and the new (S1, S2).
    """
    B, H, K = q.shape
    Hk, V = v.shape[1], v.shape[2]
    G = H // Hk
    if block_v is None:
        block_v = min(64, V) if backend == "gpu" else V  # H100, B64 H32 D128: 64 x 8 warps was fastest
    BV = block_v
    if V % BV:
        raise ValueError(f"block_v={BV} must divide V={V}")
    if backend == "gpu" and (G & (G - 1) or BV & (BV - 1) or K & (K - 1)):
        raise ValueError(f"the GPU decode kernel needs powers of two for G={G}, BV={BV}, K={K}")
    if backend == "tpu" and BV != V and BV % 128:
        raise ValueError(f"on TPU block_v={BV} must be V or a multiple of 128")
    q4 = q.reshape(B, Hk, G, K)
    k4, g14, g24 = (x.reshape(B, Hk, 1, K) for x in (k, g1, g2))
    v4 = v.reshape(B, Hk, 1, V)

    def tile(rows, cols, col_block):
        return pl.BlockSpec((None, None, rows, cols), lambda b, h, i: (b, h, 0, i if col_block else 0))

    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        w_spec = pl.BlockSpec(memory_space=pltpu.SMEM)
        params = None if interpret else pltpu.CompilerParams(dimension_semantics=("parallel",) * 3)
    else:
        w_spec = pl.BlockSpec((2,), lambda b, h, i: (0,))
        params = None
        if not interpret:
            from jax.experimental.pallas import triton as pl_triton

            params = pl_triton.CompilerParams(num_warps=num_warps, num_stages=1)
    state = tile(K, BV, True)
    o, s1n, s2n = pl.pallas_call(
        functools.partial(_decode_kernel, scale=scale, G=G),
        out_shape=(
            jax.ShapeDtypeStruct((B, Hk, G, V), q.dtype),
            jax.ShapeDtypeStruct((B, Hk, K, V), f32),
            jax.ShapeDtypeStruct((B, Hk, K, V), f32),
        ),
        grid=(B, Hk, V // BV),
        in_specs=[
            w_spec,
            tile(G, K, False),
            tile(1, K, False),
            tile(1, BV, True),
            tile(1, K, False),
            tile(1, K, False),
            state,
            state,
        ],
        out_specs=(tile(G, BV, True), state, state),
        compiler_params=params,
        interpret=interpret,
        name="dsla_decode",
    )(w, q4, k4, v4, g14, g24, s1, s2)
    return o.reshape(B, H, V), (s1n, s2n)
