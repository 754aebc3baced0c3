"""Dual-state linear attention (DSLA): two GLA states with different gates sharing q, k, v.

S1_t = diag(exp(g1_t)) S1_{t-1} + k_t^T v_t ;  S2_t = diag(exp(g2_t)) S2_{t-1} + k_t^T v_t
o_t = scale * (mix[0] * q_t S1_t + mix[1] * q_t S2_t)

`mix` is a non-negative pair (the caller's softmax of learned logits). Grouped-query layout: q has H heads, k, v and
the gates Hk, and query head h reads kv head h // (H // Hk).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsla_jax.ops import utils as _utils
from dsla_jax.ops.dsla.chunk import chunk_dsla_fused, chunk_dsla_two
from dsla_jax.ops.dsla.naive import naive_dsla
from dsla_jax.ops.dsla.recurrent import dsla_decode_step
from dsla_jax.ops.utils import (
    auto_impls,
    check_chunking,
    check_gla_shapes,
    check_impl,
    check_mix,
    resolve_scale,
    value_and_grad_from,
)

__all__ = ["dsla_attention", "dsla_decode_step", "naive_dsla", "chunk_dsla_two", "chunk_dsla_fused", "XLA_DEFAULT"]

DSLA_IMPLS = ("auto", "naive", "xla", "xla_fused", "xla_two", "pallas")

# The chunked form impl="xla" runs: "xla_fused" (one GLA of key dim 2K) or "xla_two" (two GLA passes).
# Measured with `python -m bench.ops --variants`: fused was faster forward and forward+backward on the 2-core CPU
# (B=1 H=8 D=64 T=2048: 74 vs 71 ms fwd, 234 vs 405 ms fwd+bwd; T=8192: 289 vs 312, 1119 vs 1437 ms) and on an H200
# (B=1 H=32 D=128 T=8192 bf16: 8.1 vs 9.6 ms fwd, 41.7 vs 55.8 ms fwd+bwd), and needs less temp memory.
XLA_DEFAULT = "xla_fused"

_CHUNKED = {"xla_fused": chunk_dsla_fused, "xla_two": chunk_dsla_two}


def dsla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g1: jax.Array,
    g2: jax.Array,
    mix: jax.Array,
    *,
    scale: float | None = None,
    initial_state: tuple[jax.Array, jax.Array] | None = None,
    chunk_size: int = 64,
    impl: str = "auto",
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Dual-state linear attention over a sequence.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, Hk, K] keys; H % Hk == 0, query head h reads kv head h // (H // Hk).
        v: [B, T, Hk, V] values.
        g1, g2: [B, T, Hk, K] per-channel log forget gates (<= 0) of the two states.
        mix: [2] non-negative weights of the two states' outputs.
        scale: output scale, default K ** -0.5.
        initial_state: pair (S1, S2) of [B, Hk, K, V] float32, or None (zeros).
        chunk_size: tokens per chunk of the chunked paths; T need not be a multiple of it.
        impl: "naive" (float32 token loop), "xla" (chunked, the faster of the two forms: `XLA_DEFAULT`),
            "xla_fused" / "xla_two" (a chunked form explicitly), "pallas" (the Pallas kernels of `pallas.py`, forward
            and backward; GPU, or TPU), or "auto" (see `utils.AUTO_IMPL`: on CPU values from the token loop and
            gradients through the chunked path; on GPU the Pallas kernels, forward and backward; on TPU chunked).

    Returns:
        o [B, T, H, V] in q's dtype and the final states (S1, S2), each [B, Hk, K, V] float32.
    """
    check_impl(impl, DSLA_IMPLS)
    if initial_state is not None and (not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2):
        raise ValueError(f"initial_state must be None or a pair (S1, S2), got {type(initial_state).__name__}")
    s01, s02 = (None, None) if initial_state is None else initial_state
    B, T, H, Hk, K, V = check_gla_shapes(q, k, v, (g1, g2), (s01, s02), gate_names=("g1", "g2"))
    check_mix(mix)
    check_chunking(chunk_size, 1)
    scale = resolve_scale(scale, K)
    zeros = jnp.zeros((B, Hk, K, V), jnp.float32)
    s0 = tuple(zeros if s is None else s.astype(jnp.float32) for s in (s01, s02))
    if T == 0:
        return jnp.zeros((B, 0, H, V), q.dtype), s0

    def run(name: str):
        if name == "pallas":
            from dsla_jax.ops.dsla.pallas import dsla_attention_pallas

            return lambda q, k, v, g1, g2, mix, s0: dsla_attention_pallas(
                q, k, v, g1, g2, mix, scale=scale, initial_state=s0, chunk_size=chunk_size
            )
        if name == "naive":
            return lambda q, k, v, g1, g2, mix, s0: naive_dsla(q, k, v, g1, g2, mix, scale=scale, initial_state=s0)
        fn = _CHUNKED[XLA_DEFAULT if name == "xla" else name]
        return lambda q, k, v, g1, g2, mix, s0: fn(
            q, k, v, g1, g2, mix, scale=scale, initial_state=s0, chunk_size=chunk_size
        )

    if impl == "auto":
        value_impl, grad_impl = auto_impls(has_pallas=True)
        if "pallas" in (value_impl, grad_impl) and _utils.backend() == "gpu":
            from dsla_jax.ops.dsla.pallas import gpu_dims_supported

            if not gpu_dims_supported(K, V):  # Triton tiles: powers of two; the chunked path takes any dims
                value_impl = "xla" if value_impl == "pallas" else value_impl
                grad_impl = "xla" if grad_impl == "pallas" else grad_impl
        fn = run(value_impl) if value_impl == grad_impl else value_and_grad_from(run(value_impl), run(grad_impl))
    else:
        fn = run(impl)
    return fn(q, k, v, g1, g2, mix, s0)
