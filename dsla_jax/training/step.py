"""The jitted distillation step: teacher and student forwards, loss, accumulated gradients, masked AdamW update.

One compiled step serves the whole chain: which DSLA layers run (`active` [L] bool) and which layers move
(`train_on` [L] bool) are runtime arrays. A step whose loss or gradient norm is not finite leaves parameters and
optimizer state exactly as they were (`finite` in the metrics says so); the caller then stops or skips.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from dsla_jax.training import losses
from dsla_jax.training.config import LossSection
from dsla_jax.training.forward import forward
from dsla_jax.training.params import Flat, mask_by_layer, merge
from dsla_jax.training.sharding import batch_sharding, param_shardings, replicated


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN / inf and `train.on_nan` is "stop"."""


Batch = dict[str, jax.Array]  # tokens, valid, loss_mask: [A, b, T] (A micro-batches of b rows)


@dataclass(frozen=True)
class StepSpec:
    """What the compiled step closes over (static for a run)."""

    student_graph: nnx.GraphDef
    teacher_graph: nnx.GraphDef
    loss: LossSection
    chain_layers: tuple[int, ...]
    steps_per_layer: int
    remat: bool = False


def micro_loss(
    spec: StepSpec, trainable: Flat, frozen: Flat, teacher: Flat, micro: Batch, active: jax.Array, factor: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss on one micro-batch (tokens, valid, loss_mask [b, T]); differentiable in `trainable`."""
    cfg = spec.loss
    capture = spec.chain_layers if cfg.lambda_hidden else ()
    gates = spec.chain_layers if cfg.lambda_gate else ()
    tokens, valid = micro["tokens"], micro["valid"]
    t_model = merge(spec.teacher_graph, teacher)
    t_out = forward(t_model, tokens, valid, capture=capture)
    t_logits = jax.lax.stop_gradient(t_model.logits(t_out.hidden))
    s_model = merge(spec.student_graph, trainable, frozen)
    s_out = forward(s_model, tokens, valid, active=active, capture=capture, gates=gates, remat=spec.remat)
    return losses.distill_loss(
        cfg,
        student_logits=s_model.logits(s_out.hidden),
        teacher_logits=t_logits,
        tokens=tokens,
        valid=valid,
        loss_mask=micro["loss_mask"],
        student_hidden=s_out.layer_out,
        teacher_hidden={i: jax.lax.stop_gradient(h) for i, h in t_out.layer_out.items()},
        gates=s_out.gates,
        active=active,
        factor=factor,
    )


def train_step(
    spec: StepSpec,
    opt: optax.GradientTransformation,
    trainable: Flat,
    opt_state: optax.OptState,
    frozen: Flat,
    teacher: Flat,
    batch: Batch,
    active: jax.Array,
    train_on: jax.Array,
    step_in_layer: jax.Array,
) -> tuple[Flat, optax.OptState, dict[str, jax.Array]]:
    """One optimizer step over A micro-batches (gradients averaged). Returns new params, state and metrics."""
    factor = losses.lambda_factor(spec.loss, step_in_layer, spec.steps_per_layer)
    grad_fn = jax.value_and_grad(
        lambda p, micro: micro_loss(spec, p, frozen, teacher, micro, active, factor), has_aux=True
    )
    n_micro = batch["tokens"].shape[0]

    def accumulate(carry, micro):
        (loss, terms), grads = grad_fn(trainable, micro)
        acc_loss, acc_terms, acc_grads = carry
        return (
            acc_loss + loss,
            jax.tree.map(jnp.add, acc_terms, terms),
            jax.tree.map(jnp.add, acc_grads, grads),
        ), None

    zero_terms = {k: jnp.zeros((), jnp.float32) for k in ("ce", "kl", "hidden", "gate")}
    init = (jnp.zeros((), jnp.float32), zero_terms, jax.tree.map(jnp.zeros_like, trainable))
    (loss, terms, grads), _ = jax.lax.scan(accumulate, init, batch)
    loss, terms, grads = jax.tree.map(lambda x: x / n_micro, (loss, terms, grads))
    grads = mask_by_layer(grads, train_on)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_state = opt.update(grads, opt_state, trainable)
    new_params = optax.apply_updates(trainable, mask_by_layer(updates, train_on))
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    new_params = jax.tree.map(keep, new_params, trainable)
    new_state = jax.tree.map(keep, new_state, opt_state)
    metrics = {"loss": loss, **terms, "grad_norm": grad_norm, "finite": finite, "lambda_factor": factor}
    return new_params, new_state, metrics


def opt_state_shardings(opt: optax.GradientTransformation, params: Flat, mesh: Mesh):
    """Shardings of `opt.init(params)`: parameter-shaped leaves like their parameter, the rest replicated."""
    abstract = jax.eval_shape(opt.init, params)
    p_sh = param_shardings(params, mesh)
    return optax.tree_map_params(opt, lambda _, sh: sh, abstract, p_sh, transform_non_params=lambda _: replicated(mesh))


def compile_step(
    spec: StepSpec,
    opt: optax.GradientTransformation,
    mesh: Mesh,
    trainable: Flat,
    frozen: Flat,
    teacher: Flat,
) -> tuple[Callable, Callable]:
    """(jitted step with explicit in/out shardings and donated params/optimizer state, jitted optimizer init)."""
    tr_sh = param_shardings(trainable, mesh)
    opt_sh = opt_state_shardings(opt, trainable, mesh)
    rep = replicated(mesh)
    step = jax.jit(
        lambda *args: train_step(spec, opt, *args),
        in_shardings=(
            tr_sh,
            opt_sh,
            param_shardings(frozen, mesh),
            param_shardings(teacher, mesh),
            batch_sharding(mesh),
            rep,
            rep,
            rep,
        ),
        out_shardings=(tr_sh, opt_sh, rep),
        donate_argnums=(0, 1),
    )
    init = jax.jit(opt.init, in_shardings=(tr_sh,), out_shardings=opt_sh)
    return step, init
