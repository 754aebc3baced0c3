"""One-token DSLA (decoding)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsla_jax.ops.gla.recurrent import gla_decode_step
from dsla_jax.ops.utils import check_gla_shapes, check_mix, resolve_scale


def dsla_decode_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g1: jax.Array,
    g2: jax.Array,
    mix: jax.Array,
    state: tuple[jax.Array, jax.Array],
    *,
    scale: float | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Advance both DSLA states by one token and read them out.

    Args:
        q: [B, H, K] query of the new token.
        k: [B, Hk, K] key; H % Hk == 0.
        v: [B, Hk, V] value.
        g1, g2: [B, Hk, K] log forget gates (<= 0) of the two states.
        mix: [2] weights of the two states' outputs.
        state: pair (S1, S2) of [B, Hk, K, V] float32 states before the token.
        scale: output scale, default K ** -0.5.

    Returns:
        o [B, H, V] in q's dtype and the new states (S1, S2), each [B, Hk, K, V] float32.
    """
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise ValueError(f"state must be a pair (S1, S2) of [B, Hk, K, V] arrays, got {type(state).__name__}")
    _, _, _, _, K, _ = check_gla_shapes(q, k, v, (g1, g2), state, decode=True, gate_names=("g1", "g2"))
    check_mix(mix)
    scale = resolve_scale(scale, K)
    q32 = q.astype(jnp.float32)
    o1, s1 = gla_decode_step(q32, k, v, g1, state[0], scale=scale)
    o2, s2 = gla_decode_step(q32, k, v, g2, state[1], scale=scale)
    w = mix.astype(jnp.float32)
    return (w[0] * o1 + w[1] * o2).astype(q.dtype), (s1, s2)
