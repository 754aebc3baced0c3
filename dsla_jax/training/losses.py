"""Distillation losses. Shapes: B batch, T time, V vocabulary, D hidden, L decoder layers.

    total = lambda_ce * CE + f(s) * (lambda_kl * KL + lambda_hidden * H + lambda_gate * G)

* CE: next-token cross-entropy of the student, averaged over positions where `loss_mask` is true.
* KL: KL(teacher || student) of the next-token distributions at temperature tau, times tau^2, averaged over valid
  (non-padding) positions.
* H: per converted layer, on the residual stream after it, averaged over the active layers:
  `mse`: mean squared error divided by the teacher's mean square at that layer (scale-free across layers and models);
  `kl`: KL(softmax(h_teacher / tau_h) || softmax(h_student / tau_h)) over the hidden dimension.
* G: gate diversity, the cosine similarity of the two DSLA log gates per token (flattened over heads and channels),
  averaged over valid tokens and active layers; minimising it pushes the two states towards different decay rates.
* f(s): 1, or under `decay: cosine` a cosine from 1 to `decay_final` over each layer's steps s = 0 .. S.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsla_jax.training.config import LossSection


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def cross_entropy(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """logits [B, T, V] float32, tokens [B, T], loss_mask [B, T] (position t predicts t+1) -> scalar."""
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return _masked_mean(nll, loss_mask[:, :-1])


def kl_divergence(teacher_logits: jax.Array, student_logits: jax.Array, valid: jax.Array, tau: float) -> jax.Array:
    """KL(teacher || student) at temperature tau, * tau^2: logits [B, T, V] float32, valid [B, T] -> scalar."""
    t = jax.nn.log_softmax(teacher_logits / tau, axis=-1)
    s = jax.nn.log_softmax(student_logits / tau, axis=-1)
    kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    return _masked_mean(kl, valid) * tau**2


def hidden_term(teacher: jax.Array, student: jax.Array, valid: jax.Array, kind: str, tau: float) -> jax.Array:
    """One layer's hidden-state distance: teacher, student [B, T, D], valid [B, T] -> scalar (see module docstring)."""
    t = jax.lax.stop_gradient(teacher.astype(jnp.float32))
    s = student.astype(jnp.float32)
    if kind == "mse":
        scale = _masked_mean(jnp.mean(t * t, axis=-1), valid)
        return _masked_mean(jnp.mean((s - t) ** 2, axis=-1), valid) / jnp.maximum(scale, 1e-12)
    lt = jax.nn.log_softmax(t / tau, axis=-1)
    ls = jax.nn.log_softmax(s / tau, axis=-1)
    return _masked_mean(jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1), valid)


def gate_cosine(g1: jax.Array, g2: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean cosine between the two log gates: g1, g2 [B, T, Hkv, K], valid [B, T] -> scalar in [-1, 1]."""
    a = g1.reshape(*g1.shape[:2], -1)
    b = g2.reshape(*g2.shape[:2], -1)
    cos = jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)
    return _masked_mean(cos, valid)


def layer_average(values: dict[int, jax.Array], active: jax.Array) -> jax.Array:
    """Mean of per-layer scalars over the active layers (active [L] bool); 0 when none is active."""
    if not values:
        return jnp.zeros((), jnp.float32)
    w = jnp.stack([active[i].astype(jnp.float32) for i in values])
    v = jnp.stack(list(values.values()))
    return jnp.sum(w * v) / jnp.maximum(jnp.sum(w), 1.0)


def lambda_factor(cfg: LossSection, step: jax.Array, total_steps: int) -> jax.Array:
    """f(s): 1, or a cosine from 1 down to `decay_final` over a layer's `total_steps` steps."""
    if cfg.decay == "none":
        return jnp.ones((), jnp.float32)
    frac = jnp.clip(step.astype(jnp.float32) / max(total_steps, 1), 0.0, 1.0)
    return cfg.decay_final + (1.0 - cfg.decay_final) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))


def distill_loss(
    cfg: LossSection,
    *,
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    tokens: jax.Array,
    valid: jax.Array,
    loss_mask: jax.Array,
    student_hidden: dict[int, jax.Array],
    teacher_hidden: dict[int, jax.Array],
    gates: dict[int, tuple[jax.Array, jax.Array]],
    active: jax.Array,
    factor: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The total loss and its terms {"ce", "kl", "hidden", "gate"} (unweighted), all float32 scalars."""
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    zero = jnp.zeros((), jnp.float32)
    ce = cross_entropy(student_logits, tokens, loss_mask) if cfg.lambda_ce else zero
    kl = kl_divergence(teacher_logits, student_logits, valid, cfg.temperature) if cfg.lambda_kl else zero
    hidden = zero
    if cfg.lambda_hidden:
        per_layer = {
            i: hidden_term(teacher_hidden[i], h, valid, cfg.hidden_loss, cfg.hidden_temperature)
            for i, h in student_hidden.items()
        }
        hidden = layer_average(per_layer, active)
    gate = zero
    if cfg.lambda_gate:
        gate = layer_average({i: gate_cosine(g1, g2, valid) for i, (g1, g2) in gates.items()}, active)
    total = cfg.lambda_ce * ce + factor * (cfg.lambda_kl * kl + cfg.lambda_hidden * hidden + cfg.lambda_gate * gate)
    return total, {"ce": ce, "kl": kl, "hidden": hidden, "gate": gate}
