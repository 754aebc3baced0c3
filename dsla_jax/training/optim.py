"""The optimizer: gradient clipping, then AdamW with linear warmup and cosine decay (restarted for every layer).

Weight decay skips vectors and scalars (biases, norms, the DSLA mixing logits) through an optax mask.
"""

from __future__ import annotations

import optax

from dsla_jax.training.config import OptimSection


def lr_schedule(cfg: OptimSection, steps_per_layer: int) -> optax.Schedule:
    """Linear warmup from lr / (warmup + 1) to lr over `warmup_steps`, then cosine down to lr * min_lr_ratio."""
    warmup = min(cfg.warmup_steps, max(steps_per_layer - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=cfg.lr / (warmup + 1),
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(steps_per_layer, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def _decay_mask(params: dict) -> dict:
    return {k: v.ndim >= 2 for k, v in params.items()}


def make_optimizer(cfg: OptimSection, steps_per_layer: int) -> optax.GradientTransformation:
    """clip_by_global_norm (when clip_norm > 0) -> AdamW(schedule) on a flat parameter dictionary."""
    adamw = optax.adamw(
        lr_schedule(cfg, steps_per_layer),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=_decay_mask,
    )
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw) if cfg.clip_norm else adamw
