"""CUDA lowering of the whole Pallas op on any host, for tests that check which kernels a configuration launches."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsla_jax.ops.dsla.pallas import dsla_attention_pallas


def lowered_op(config, B: int, T: int, H: int, K: int, V: int, grad: bool = False) -> str:
    """The StableHLO text of `dsla_attention_pallas(..., backend="gpu", config=config)` lowered for CUDA on bfloat16
    inputs [B, T, H, K] / [B, T, H, V] (with `grad`: the gradient of sum(o) in q, k, v), kernels named inside."""
    sd = jax.ShapeDtypeStruct
    x, y = sd((B, T, H, K), jnp.bfloat16), sd((B, T, H, V), jnp.bfloat16)

    def f(q, k, v, g1, g2, mix):
        return dsla_attention_pallas(q, k, v, g1, g2, mix, backend="gpu", config=config)[0]

    fn = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2)) if grad else f
    return jax.jit(fn).trace(x, x, y, x, x, sd((2,), jnp.float32)).lower(lowering_platforms=("cuda",)).as_text()
