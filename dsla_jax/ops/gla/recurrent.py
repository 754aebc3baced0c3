"""One-token gated linear attention (decoding)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsla_jax.ops.utils import check_gla_shapes, group_queries, matmul_precision, resolve_scale, ungroup_queries


def gla_decode_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    state: jax.Array,
    *,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Advance a GLA state by one token and read it out.

    Args:
        q: [B, H, K] query of the new token.
        k: [B, Hk, K] key; H % Hk == 0.
        v: [B, Hk, V] value.
        g: [B, Hk, K] log forget gate (<= 0).
        state: [B, Hk, K, V] float32 state before the token.
        scale: output scale, default K ** -0.5.

    Returns:
        o [B, H, V] in q's dtype and the new state [B, Hk, K, V] float32.
    """
    B, _, H, Hk, K, V = check_gla_shapes(q, k, v, (g,), (state,), decode=True)
    scale = resolve_scale(scale, K)
    f32 = jnp.float32
    k, v, g = k.astype(f32), v.astype(f32), g.astype(f32)
    new = jnp.exp(g)[..., None] * state.astype(f32) + k[..., :, None] * v[..., None, :]
    qg = group_queries(q.astype(f32), Hk)  # [B, Hk, G, K]
    o = scale * jnp.einsum("bhgk,bhkv->bhgv", qg, new, precision=matmul_precision())
    return ungroup_queries(o).astype(q.dtype), new
