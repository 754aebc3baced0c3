"""Gated linear attention (one state per head): sequence form and one-token decode step.

S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t ;  o_t = scale * q_t S_t.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsla_jax.ops.gla.chunk import chunk_gla
from dsla_jax.ops.gla.naive import naive_gla
from dsla_jax.ops.gla.recurrent import gla_decode_step
from dsla_jax.ops.utils import (
    auto_impls,
    check_chunking,
    check_gla_shapes,
    check_impl,
    pallas_not_implemented,
    resolve_scale,
    value_and_grad_from,
)

__all__ = ["gla_attention", "gla_decode_step", "naive_gla", "chunk_gla"]

GLA_IMPLS = ("auto", "naive", "xla", "pallas")


def gla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    chunk_size: int = 64,
    impl: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Gated linear attention over a sequence.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, Hk, K] keys; H % Hk == 0, query head h reads kv head h // (H // Hk).
        v: [B, T, Hk, V] values.
        g: [B, T, Hk, K] per-channel log forget gates (<= 0).
        scale: output scale, default K ** -0.5.
        initial_state: [B, Hk, K, V] float32 or None (zeros).
        chunk_size: tokens per chunk of the chunked path; T need not be a multiple of it.
        impl: "naive" (float32 token loop), "xla" (chunked), "pallas" (not yet), or "auto" (see `utils.AUTO_IMPL`:
            on CPU values from the token loop and gradients through the chunked path, elsewhere chunked).

    Returns:
        o [B, T, H, V] in q's dtype and the final state [B, Hk, K, V] float32.
    """
    check_impl(impl, GLA_IMPLS)
    B, T, H, Hk, K, V = check_gla_shapes(q, k, v, (g,), (initial_state,))
    check_chunking(chunk_size, 1)
    scale = resolve_scale(scale, K)
    s0 = jnp.zeros((B, Hk, K, V), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    if T == 0:
        return jnp.zeros((B, 0, H, V), q.dtype), s0
    if impl == "pallas":
        pallas_not_implemented()

    def run(name: str):
        if name == "naive":
            return lambda q, k, v, g, s0: naive_gla(q, k, v, g, scale=scale, initial_state=s0)
        return lambda q, k, v, g, s0: chunk_gla(q, k, v, g, scale=scale, initial_state=s0, chunk_size=chunk_size)

    if impl == "auto":
        value_impl, grad_impl = auto_impls()
        fn = run(value_impl) if value_impl == grad_impl else value_and_grad_from(run(value_impl), run(grad_impl))
    else:
        fn = run(impl)
    return fn(q, k, v, g, s0)
