"""Reference DSLA: a float32 token-by-token `lax.scan` over two GLA states.

S1_t = diag(exp(g1_t)) S1_{t-1} + k_t^T v_t ;  S2_t = diag(exp(g2_t)) S2_{t-1} + k_t^T v_t
o_t = scale * (mix[0] * q_t S1_t + mix[1] * q_t S2_t).

Its autodiff keeps two [K, V] states per token and head as residuals: for references, short sequences, inference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsla_jax.ops.utils import check_gla_shapes, check_mix, matmul_precision, resolve_scale


def naive_dsla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g1: jax.Array,
    g2: jax.Array,
    mix: jax.Array,
    *,
    scale: float | None = None,
    initial_state: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Dual-state linear attention by a token loop.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, Hk, K] keys; H % Hk == 0, query head h reads kv head h // (H // Hk).
        v: [B, T, Hk, V] values.
        g1, g2: [B, T, Hk, K] log forget gates (<= 0) of the two states.
        mix: [2] weights of the two states' outputs.
        scale: output scale, default K ** -0.5.
        initial_state: pair of [B, Hk, K, V] float32, or None (zeros).

    Returns:
        o [B, T, H, V] in q's dtype and the final states (S1, S2), each [B, Hk, K, V] float32.
    """
    s01, s02 = (None, None) if initial_state is None else initial_state
    B, T, H, Hk, K, V = check_gla_shapes(q, k, v, (g1, g2), (s01, s02), gate_names=("g1", "g2"))
    check_mix(mix)
    scale = resolve_scale(scale, K)
    G = H // Hk
    f32 = jnp.float32
    qs = q.astype(f32).reshape(B, T, Hk, G, K).transpose(1, 0, 2, 3, 4)  # [T, B, Hk, G, K]
    ks, vs, g1s, g2s = (x.astype(f32).transpose(1, 0, 2, 3) for x in (k, v, g1, g2))  # [T, B, Hk, *]
    zeros = jnp.zeros((B, Hk, K, V), f32)
    s0 = tuple(zeros if s is None else s.astype(f32) for s in (s01, s02))
    w = mix.astype(f32)

    def step(states, xs):
        q_t, k_t, v_t, g1_t, g2_t = xs
        kv = k_t[..., :, None] * v_t[..., None, :]
        s1 = jnp.exp(g1_t)[..., None] * states[0] + kv
        s2 = jnp.exp(g2_t)[..., None] * states[1] + kv
        o1 = jnp.einsum("bhgk,bhkv->bhgv", q_t, s1, precision=matmul_precision())
        o2 = jnp.einsum("bhgk,bhkv->bhgv", q_t, s2, precision=matmul_precision())
        return (s1, s2), scale * (w[0] * o1 + w[1] * o2)

    states, o = jax.lax.scan(step, s0, (qs, ks, vs, g1s, g2s))
    o = o.reshape(T, B, H, V).transpose(1, 0, 2, 3)
    return o.astype(q.dtype), states
