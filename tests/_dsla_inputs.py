"""Random DSLA inputs shared by the op and kernel tests: q, k, v, two gate tensors, mix and initial states."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def make_gates(key, shape, kind: str, *, strong_fraction: float = 0.3, weak_scale: float = 1e-4) -> jax.Array:
    """Log forget gates [*shape] of one kind:
    strong: uniform in [-50, 0] (chunk decay ranges of thousands: exp(cumsum) under/overflows within a chunk);
    weak: uniform in [-1e-3, 0] (long memory); logsig: log-sigmoid / 16 of a normal, GLA-style;
    mixed: per token strong (with probability `strong_fraction`) or strong * `weak_scale`; min: every gate at -50."""
    if kind == "strong":
        return jax.random.uniform(key, shape, minval=-50.0, maxval=0.0)
    if kind == "weak":
        return jax.random.uniform(key, shape, minval=-1e-3, maxval=0.0)
    if kind == "logsig":
        return jax.nn.log_sigmoid(jax.random.normal(key, shape)) / 16
    if kind == "mixed":
        k1, k2 = jax.random.split(key)
        strong = jax.random.uniform(k1, shape, minval=-50.0, maxval=0.0)
        return jnp.where(jax.random.bernoulli(k2, strong_fraction, shape), strong, strong * weak_scale)
    if kind == "min":
        return jnp.full(shape, -50.0)
    raise ValueError(kind)


def random_dsla_inputs(seed, B, T, H, Hk, K, V, dtype, gates=("strong", "weak"), init=True, **gate_kw):
    """(q [B,T,H,K], k [B,T,Hk,K], v [B,T,Hk,V], g1, g2 [B,T,Hk,K], mix [2], initial states pair or None)."""
    ks = jax.random.split(jax.random.key(seed), 8)
    q = jax.random.normal(ks[0], (B, T, H, K)).astype(dtype)
    k = (jax.random.normal(ks[1], (B, T, Hk, K)) * K**-0.5).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, Hk, V)).astype(dtype)
    g1 = make_gates(ks[3], (B, T, Hk, K), gates[0], **gate_kw).astype(dtype)
    g2 = make_gates(ks[4], (B, T, Hk, K), gates[1], **gate_kw).astype(dtype)
    mix = jax.nn.softmax(jax.random.normal(ks[5], (2,)))
    s0 = None
    if init:
        s0 = (jax.random.normal(ks[6], (B, Hk, K, V)), jax.random.normal(ks[7], (B, Hk, K, V)))
    return q, k, v, g1, g2, mix, s0
