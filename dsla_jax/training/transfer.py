"""Attention transfer (as in LoLCATs, Zhang et al. 2024): before the chain, every chain layer's fresh DSLA mixer is
trained to reproduce its softmax attention's output on the teacher's own inputs to that layer.

    loss = sum over chain layers i of  sum_valid (dsla_i(h_i) - attn_i(h_i))^2 / sum_valid attn_i(h_i)^2

with h_i = input_layernorm(x_i), x_i the teacher's residual stream entering layer i. The layers are independent given
the teacher's activations: one teacher forward per batch yields every layer's input and target, each layer's
parameters get only its own (normalised, so layers weigh alike) term, and gradients are clipped per layer. Only the
DSLA mixer parameters (`self_attn.*` of the trainable set: q/k/v/o, gates, alpha) move; MLPs / norms, even when the
chain trains them, do not. `transfer.steps: 0` (the default) switches the stage off.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from dsla_jax.layers.context import MixerInputs
from dsla_jax.models.llama import Llama
from dsla_jax.training.config import DistillConfig
from dsla_jax.training.data import BatchIterator, TokenRows
from dsla_jax.training.forward import mixer_inputs, original_attention
from dsla_jax.training.layerwise import mixer_pair_sums
from dsla_jax.training.metrics_log import MetricsLog
from dsla_jax.training.optim import lr_schedule, make_optimizer
from dsla_jax.training.params import SEP, Flat, layer_index, merge
from dsla_jax.training.sharding import (
    batch_sharding,
    check_batch,
    local_micro_batches,
    param_shardings,
    put_batch,
    replicated,
)
from dsla_jax.training.step import NonFiniteLoss, opt_state_shardings


def is_mixer_key(key: str) -> bool:
    """A DSLA mixer parameter (`layers.{i}.self_attn.…`), as opposed to an MLP / norm one."""
    parts = key.split(SEP)
    return len(parts) > 2 and parts[0] == "layers" and parts[2] == "self_attn"


def split_mixer(trainable: Flat) -> tuple[Flat, Flat]:
    """(the mixer parameters of the trainable set, the rest of it)."""
    return (
        {k: v for k, v in trainable.items() if is_mixer_key(k)},
        {k: v for k, v in trainable.items() if not is_mixer_key(k)},
    )


def teacher_mixer_io(
    teacher: Llama, tokens: jax.Array, valid: jax.Array, layers: tuple[int, ...]
) -> tuple[MixerInputs, dict[int, tuple[jax.Array, jax.Array]]]:
    """Traced teacher forward up to the last of `layers`: (MixerInputs, {i: (h_i, attention_i(h_i))}), each [B, T, D],
    h_i the normed input of layer i's token mixer."""
    info = mixer_inputs(teacher, valid)
    x = teacher.embed_tokens(tokens)
    out = {}
    for i, layer in enumerate(teacher.layers):
        if i > max(layers):
            break
        h = layer.input_layernorm(x)
        a = original_attention(layer)(h, info)[0]
        if i in layers:
            out[i] = (h, a)
        x = x + a
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return info, out


def relative_mse(y: jax.Array, target: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of squared errors, sum of squared targets) over valid tokens, float32 scalars."""
    y, target = y.astype(jnp.float32), target.astype(jnp.float32)
    m = valid[..., None]
    return jnp.sum(jnp.where(m, (y - target) ** 2, 0.0)), jnp.sum(jnp.where(m, target * target, 0.0))


@dataclass(frozen=True)
class TransferSpec:
    student_graph: nnx.GraphDef
    teacher_graph: nnx.GraphDef
    layers: tuple[int, ...]  # the chain layers, sorted
    clip_norm: float


def transfer_loss(
    spec: TransferSpec, mixer: Flat, rest: Flat, frozen: Flat, teacher: Flat, tokens: jax.Array, valid: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(sum over layers of the relative MSE, per-layer relative MSE [n]) on one micro-batch."""
    t_model = merge(spec.teacher_graph, teacher)
    info, io = teacher_mixer_io(t_model, tokens, valid, spec.layers)
    s_model = merge(spec.student_graph, mixer, rest, frozen)
    per_layer = []
    for i in spec.layers:
        h, a = jax.tree.map(jax.lax.stop_gradient, io[i])
        err, ref = relative_mse(s_model.layers[i].self_attn(h, info)[0], a, valid)
        per_layer.append(err / jnp.maximum(ref, 1e-30))
    per_layer = jnp.stack(per_layer)
    return jnp.sum(per_layer), per_layer


def clip_per_layer(grads: Flat, layers: tuple[int, ...], clip_norm: float) -> tuple[Flat, jax.Array]:
    """Each layer's gradients clipped to global norm `clip_norm` on their own (0 = off); also the norms [n]."""
    norms = jnp.stack([optax.global_norm([g for k, g in grads.items() if layer_index(k) == i]) for i in layers])
    if not clip_norm:
        return grads, norms
    scale = {i: jnp.minimum(1.0, clip_norm / jnp.maximum(n, 1e-12)) for i, n in zip(layers, norms)}
    return {k: g * scale[layer_index(k)].astype(g.dtype) for k, g in grads.items()}, norms


def transfer_step(
    spec: TransferSpec,
    opt: optax.GradientTransformation,
    mixer: Flat,
    opt_state: optax.OptState,
    rest: Flat,
    frozen: Flat,
    teacher: Flat,
    batch: dict[str, jax.Array],
) -> tuple[Flat, optax.OptState, dict[str, jax.Array]]:
    """One optimizer step over A micro-batches (batch tokens / valid [A, b, T]; gradients averaged)."""
    grad_fn = jax.value_and_grad(
        lambda p, tokens, valid: transfer_loss(spec, p, rest, frozen, teacher, tokens, valid), has_aux=True
    )

    def accumulate(carry, micro):
        (loss, per_layer), grads = grad_fn(mixer, micro["tokens"], micro["valid"])
        return jax.tree.map(jnp.add, carry, (loss, per_layer, grads)), None

    n = len(spec.layers)
    init = (jnp.zeros((), jnp.float32), jnp.zeros((n,), jnp.float32), jax.tree.map(jnp.zeros_like, mixer))
    (loss, per_layer, grads), _ = jax.lax.scan(accumulate, init, batch)
    n_micro = batch["tokens"].shape[0]
    loss, per_layer, grads = jax.tree.map(lambda x: x / n_micro, (loss, per_layer, grads))
    grads, norms = clip_per_layer(grads, spec.layers, spec.clip_norm)
    finite = jnp.isfinite(loss) & jnp.all(jnp.isfinite(norms))
    updates, new_state = opt.update(grads, opt_state, mixer)
    new_mixer = optax.apply_updates(mixer, updates)
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    new_mixer = jax.tree.map(keep, new_mixer, mixer)
    new_state = jax.tree.map(keep, new_state, opt_state)
    metrics = {"loss": loss / n, "layer_mse": per_layer, "grad_norm": jnp.max(norms), "finite": finite}
    return new_mixer, new_state, metrics


def make_transfer_optimizer(cfg: DistillConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (the `optim` section's betas / eps / weight decay / min_lr_ratio) with `transfer.lr` and
    `transfer.warmup_steps` over `transfer.steps`; clipping is per layer, in the step."""
    t = cfg.transfer
    optim = dataclasses.replace(cfg.optim, lr=t.lr, warmup_steps=t.warmup_steps, clip_norm=0.0)
    return make_optimizer(optim, t.steps), lr_schedule(optim, t.steps)


def compile_transfer(
    spec: TransferSpec,
    opt: optax.GradientTransformation,
    mesh: Mesh,
    mixer: Flat,
    rest: Flat,
    frozen: Flat,
    teacher: Flat,
) -> tuple[Callable, Callable]:
    """(jitted transfer step, sharded like the chain's step with donated mixer params / state, jitted opt init)."""
    m_sh = param_shardings(mixer, mesh)
    opt_sh = opt_state_shardings(opt, mixer, mesh)
    step = jax.jit(
        lambda *args: transfer_step(spec, opt, *args),
        in_shardings=(
            m_sh,
            opt_sh,
            param_shardings(rest, mesh),
            param_shardings(frozen, mesh),
            param_shardings(teacher, mesh),
            batch_sharding(mesh),
        ),
        out_shardings=(m_sh, opt_sh, replicated(mesh)),
        donate_argnums=(0, 1),
    )
    init = jax.jit(opt.init, in_shardings=(m_sh,), out_shardings=opt_sh)
    return step, init


# ---- the stage ---------------------------------------------------------------------------------------------------


@dataclass
class TransferResult:
    trainable: Flat  # the whole trainable set, its mixer parameters transferred
    tokens: int  # training tokens (valid positions) the stage consumed, each row counted once
    steps: int
    skipped: int
    first_mse: dict[int, float]  # per-layer relative MSE on the first batch (before any update)
    last_mse: dict[int, float]  # ... and on the last batch (before its update)


def run_transfer(
    cfg: DistillConfig,
    layers: tuple[int, ...],
    student_graph: nnx.GraphDef,
    teacher_graph: nnx.GraphDef,
    trainable: Flat,
    frozen: Flat,
    teacher_flat: Flat,
    rows: TokenRows,
    mesh: Mesh,
    log: MetricsLog,
    *,
    tokens_before: int = 0,
) -> TransferResult:
    """`transfer.steps` attention-transfer steps on `rows` for the DSLA mixers of `layers`; returns the updated
    trainable set (its non-mixer entries unchanged). Batches: `transfer.batch_size` rows (`train.batch_size` when 0),
    drawn from their own seeded permutation (data.seed + 1), so the chain's batches are those of a run without it.
    `tokens_before` only offsets the `tokens` field of the metrics records."""
    t = cfg.transfer
    layers = tuple(sorted(int(i) for i in layers))
    batch_size = cfg.transfer_batch_size
    accum = t.grad_accum
    check_batch(batch_size // accum, mesh)
    iterator = BatchIterator(len(rows), batch_size, seed=cfg.data.seed + 1, shuffle=cfg.data.shuffle)
    mixer, rest = split_mixer(trainable)
    opt, schedule = make_transfer_optimizer(cfg)
    spec = TransferSpec(student_graph, teacher_graph, layers, t.clip_norm)
    step_fn, opt_init = compile_transfer(spec, opt, mesh, mixer, rest, frozen, teacher_flat)
    opt_state = opt_init(mixer)
    b_sh = batch_sharding(mesh)
    is_main = jax.process_index() == 0
    tokens = skipped = 0
    first = last = {}
    bar = tqdm(total=t.steps, desc="attention transfer", disable=not (cfg.log.progress and is_main), unit="step")
    for s in range(t.steps):
        idx = iterator.next_indices()
        n_tokens = int(rows.valid[idx].sum())
        batch = put_batch(local_micro_batches(rows, idx, accum, keys=("tokens", "valid")), b_sh)
        t0 = time.perf_counter()
        mixer, opt_state, m = step_fn(mixer, opt_state, rest, frozen, teacher_flat, batch)
        m = jax.device_get(m)
        dt = time.perf_counter() - t0
        tokens += n_tokens
        per_layer = {i: float(v) for i, v in zip(layers, np.asarray(m["layer_mse"]))}
        first = first or per_layer
        last = per_layer
        finite = bool(m["finite"])
        record = {
            "step": s + 1,
            "loss": float(m["loss"]),
            "layer_mse": {str(i): v for i, v in per_layer.items()},
            "grad_norm": float(m["grad_norm"]),
            "lr": float(schedule(s)),
            "tokens": tokens_before + tokens,
            "tokens_per_s": n_tokens / dt,
            "step_s": dt,
            "skipped": not finite,
        }
        if not finite:
            log.write("nan", stage="transfer", **record)
            if cfg.train.on_nan == "stop":
                raise NonFiniteLoss(
                    f"attention transfer: loss is {record['loss']} (largest layer grad norm {record['grad_norm']}) "
                    f"at transfer step {s + 1}; the step was not applied. Lower transfer.lr, or set "
                    "train.on_nan=skip to skip such steps"
                )
            skipped += 1
        if (s + 1) % cfg.log.every_steps == 0 or s + 1 == t.steps:
            log.write("transfer", **record)
        bar.update(1)
        bar.set_postfix(mse=f"{record['loss']:.4f}", refresh=False)
    bar.close()
    return TransferResult({**trainable, **mixer, **rest}, tokens, t.steps, skipped, first, last)


# ---- measuring (host loop over layers, for logs and tests) -----------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 2))
def _layer_relative_sums(layer_graph, layer_state, mixer_graph, mixer_state, x: jax.Array, info: MixerInputs):
    layer = nnx.merge(layer_graph, layer_state)
    mixer = nnx.merge(mixer_graph, mixer_state)
    h = layer.input_layernorm(x)
    return relative_mse(mixer(h, info)[0], original_attention(layer)(h, info)[0], info.valid)


def layer_mse(
    teacher: Llama, mixers: dict, rows: TokenRows, *, num_rows: int = 8, batch_size: int = 8
) -> dict[int, float]:
    """{layer: sum (mixer(h) - attention(h))^2 / sum attention(h)^2} over the first `num_rows` rows, h the teacher's
    normed input to that layer; `mixers` maps layers to DSLA modules."""
    err, ref = mixer_pair_sums(teacher, mixers, rows, _layer_relative_sums, num_rows=num_rows, batch_size=batch_size)
    return {i: float(err[i] / max(ref[i], 1e-30)) for i in mixers}


def format_mse(values: dict[int, float]) -> str:
    return ", ".join(f"{i}: {v:.3g}" for i, v in values.items()) + f" (mean {np.mean(list(values.values())):.3g})"
