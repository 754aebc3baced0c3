"""Reference gated linear attention: a float32 token-by-token `lax.scan`.

S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t ;  o_t = scale * q_t S_t.

Short and obviously right; the chunked path is tested against it. Its autodiff keeps one [K, V] state per token and
head as residual, so it is for references, short sequences and inference only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsla_jax.ops.utils import check_gla_shapes, matmul_precision, resolve_scale


def naive_gla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Gated linear attention by a token loop.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, Hk, K] keys; H % Hk == 0, query head h reads kv head h // (H // Hk).
        v: [B, T, Hk, V] values.
        g: [B, T, Hk, K] log forget gates (<= 0).
        scale: output scale, default K ** -0.5.
        initial_state: [B, Hk, K, V] float32 or None (zeros).

    Returns:
        o [B, T, H, V] in q's dtype and the final state [B, Hk, K, V] float32.
    """
    B, T, H, Hk, K, V = check_gla_shapes(q, k, v, (g,), (initial_state,))
    scale = resolve_scale(scale, K)
    G = H // Hk
    f32 = jnp.float32
    qs = q.astype(f32).reshape(B, T, Hk, G, K).transpose(1, 0, 2, 3, 4)  # [T, B, Hk, G, K]
    ks, vs, gs = (x.astype(f32).transpose(1, 0, 2, 3) for x in (k, v, g))  # [T, B, Hk, *]
    s0 = jnp.zeros((B, Hk, K, V), f32) if initial_state is None else initial_state.astype(f32)

    def step(s, xs):
        q_t, k_t, v_t, g_t = xs
        s = jnp.exp(g_t)[..., None] * s + k_t[..., :, None] * v_t[..., None, :]
        o_t = scale * jnp.einsum("bhgk,bhkv->bhgv", q_t, s, precision=matmul_precision())
        return s, o_t

    s, o = jax.lax.scan(step, s0, (qs, ks, vs, gs))
    o = o.reshape(T, B, H, V).transpose(1, 0, 2, 3)
    return o.astype(q.dtype), s
