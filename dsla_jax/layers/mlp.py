"""SwiGLU feed-forward block: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class SwiGLU(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = nnx.Linear(dim, hidden, **kw)
        self.up_proj = nnx.Linear(dim, hidden, **kw)
        self.down_proj = nnx.Linear(hidden, dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, dim] -> [B, T, dim]."""
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
