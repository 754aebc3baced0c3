"""The teacher run one decoder layer at a time, with jitted pieces shared by all layers of the same structure.

Scoring or calibrating L layers then compiles a handful of programs (one per mixer kind), not L. Used by the
conversion-order scores (`ordering.py`) and the output-scale calibration of fresh DSLA layers (`calibrate.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dsla_jax.layers.context import MixerInputs
from dsla_jax.models.llama import Llama
from dsla_jax.training.data import TokenRows
from dsla_jax.training.forward import decoder_layer, mixer_inputs, original_attention


@functools.partial(jax.jit, static_argnums=(0, 2))
def apply_layer(layer_graph, layer_state, mixer_graph, mixer_state, x: jax.Array, info: MixerInputs) -> jax.Array:
    """One decoder layer with its original attention (mixer_graph None) or another mixer: x [B, T, D] -> [B, T, D]."""
    layer = nnx.merge(layer_graph, layer_state)
    mixer = original_attention(layer) if mixer_graph is None else nnx.merge(mixer_graph, mixer_state)
    return decoder_layer(layer, mixer, x, info)


@functools.partial(jax.jit, static_argnums=(0, 2))
def mixer_sumsq(layer_graph, layer_state, mixer_graph, mixer_state, x: jax.Array, info: MixerInputs) -> jax.Array:
    """Sum of squares of the mixer's output [B, T, D] over valid tokens (the layer's input x [B, T, D])."""
    layer = nnx.merge(layer_graph, layer_state)
    mixer = original_attention(layer) if mixer_graph is None else nnx.merge(mixer_graph, mixer_state)
    y = mixer(layer.input_layernorm(x), info)[0].astype(jnp.float32)
    return jnp.sum(jnp.where(info.valid[..., None], y * y, 0.0))


@functools.partial(jax.jit, static_argnums=0)
def embed(graph, state, tokens: jax.Array) -> jax.Array:
    return nnx.merge(graph, state).embed_tokens(tokens)


def _log_probs_of(graph, state, x: jax.Array) -> jax.Array:
    """Final norm + logits: residual stream x [B, T, D] -> log-probabilities [B, T, V] float32."""
    model = nnx.merge(graph, state)
    return jax.nn.log_softmax(model.logits(model.norm(x)), axis=-1)


log_probs = jax.jit(_log_probs_of, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def kl_sum(graph, state, x: jax.Array, teacher_logp: jax.Array, valid: jax.Array) -> jax.Array:
    """Sum over valid tokens of KL(teacher || the model's next-token distribution from residual stream x)."""
    logp = _log_probs_of(graph, state, x)
    kl = jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - logp), axis=-1)
    return jnp.sum(jnp.where(valid, kl, 0.0))


def split_layers(model: Llama) -> list[tuple[nnx.GraphDef, nnx.State]]:
    return [nnx.split(layer) for layer in model.layers]


def layer_inputs(model: Llama, layers, tokens: jax.Array, valid: jax.Array) -> tuple[MixerInputs, list[jax.Array]]:
    """The teacher's residual stream entering every layer and after the last: [x_0, ..., x_L], each [B, T, D]."""
    graph, state = nnx.split(model)
    info = mixer_inputs(model, valid)
    xs = [embed(graph, state, tokens)]
    for lg, ls in layers:
        xs.append(apply_layer(lg, ls, None, None, xs[-1], info))
    return info, xs


def row_batches(rows: TokenRows, batch_size: int, max_rows: int):
    """(tokens, valid) device batches of the first `max_rows` rows."""
    n = min(len(rows), max_rows)
    for start in range(0, n, batch_size):
        part = rows.take(slice(start, min(start + batch_size, n)))
        yield jnp.asarray(part["tokens"]), jnp.asarray(part["valid"])


def mixer_pair_sums(teacher: Llama, mixers: dict, rows: TokenRows, pair, *, num_rows: int, batch_size: int):
    """Two sums per layer over the first `num_rows` rows: `pair(layer_graph, layer_state, mixer_graph, mixer_state,
    x, info)` -> (a, b) on x, the teacher's input to that layer; `mixers` maps layers to DSLA modules. Returns the
    dicts ({layer: sum a}, {layer: sum b})."""
    layers = split_layers(teacher)
    split = {i: nnx.split(m) for i, m in mixers.items()}
    sums_a = dict.fromkeys(mixers, 0.0)
    sums_b = dict.fromkeys(mixers, 0.0)
    for tokens, valid in row_batches(rows, batch_size, num_rows):
        info, xs = layer_inputs(teacher, layers, tokens, valid)
        for i, (mg, ms) in split.items():
            a, b = pair(*layers[i], mg, ms, xs[i], info)
            sums_a[i] += float(a)
            sums_b[i] += float(b)
    return sums_a, sums_b
