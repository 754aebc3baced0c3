"""The Llama forward pass, run layer by layer from `model.layers` so that training can see inside it.

`forward` equals `Llama.__call__` (no cache) and additionally
* returns the residual stream after chosen layers (for the hidden-state loss),
* returns the two log gates of chosen DSLA layers (for the gate-diversity loss),
* with `active` [L] bool, runs a student's DSLA layer i only where active[i] is true and its parked original
  attention otherwise, through `lax.cond`: one compiled program serves every step of the conversion chain.

`decoder_layer` runs one layer with any token mixer; the ordering code jits it once per mixer kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from dsla_jax.layers.attention import Attention
from dsla_jax.layers.context import MixerInputs
from dsla_jax.layers.dsla import DSLA
from dsla_jax.layers.rope import rope_tables
from dsla_jax.models.llama import DecoderLayer, Llama


@dataclass
class ForwardOut:
    hidden: jax.Array  # [B, T, D] after the final norm
    layer_out: dict[int, jax.Array]  # layer -> residual stream after it, [B, T, D]
    gates: dict[int, tuple[jax.Array, jax.Array]]  # DSLA layer -> (g1, g2), each [B, T, Hkv, K] float32


def mixer_inputs(model: Llama, valid: jax.Array) -> MixerInputs:
    """MixerInputs for a cache-free pass over rows that start at position 0: valid [B, T] bool."""
    b, t = valid.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos, sin = rope_tables(model.inv_freq[...], positions)
    return MixerInputs(positions, valid, cos, sin, jnp.zeros((), jnp.int32), None)


def decoder_layer(layer: DecoderLayer, mixer, x: jax.Array, info: MixerInputs) -> jax.Array:
    """One decoder layer with `mixer` as its token mixer: x [B, T, D] -> [B, T, D]."""
    x = x + mixer(layer.input_layernorm(x), info)[0]
    return x + layer.mlp(layer.post_attention_layernorm(x))


def original_attention(layer: DecoderLayer) -> Attention:
    """The layer's softmax attention: the active mixer, or the parked one under a DSLA layer."""
    attn = layer.self_attn if isinstance(layer.self_attn, Attention) else layer.parked
    if not isinstance(attn, Attention):
        raise ValueError("layer has no softmax attention")
    return attn


def forward(
    model: Llama,
    tokens: jax.Array,
    valid: jax.Array,
    *,
    active: jax.Array | None = None,
    capture: tuple[int, ...] = (),
    gates: tuple[int, ...] = (),
    remat: bool = False,
) -> ForwardOut:
    """tokens, valid [B, T] -> ForwardOut. `active` [L] bool selects, per DSLA layer, DSLA (True) or its attention."""
    info = mixer_inputs(model, valid)
    x = model.embed_tokens(tokens)
    layer_out, gate_out = {}, {}
    for i, layer in enumerate(model.layers):
        mixer = layer.self_attn
        if isinstance(mixer, DSLA) and i in gates:
            g1, g2 = mixer.gates(layer.input_layernorm(x))
            gate_out[i] = (g1, g2)

        def run(x, layer=layer, mixer=mixer, i=i):
            if isinstance(mixer, DSLA) and active is not None:
                attn = original_attention(layer)
                return jax.lax.cond(
                    active[i],
                    lambda x: decoder_layer(layer, mixer, x, info),
                    lambda x: decoder_layer(layer, attn, x, info),
                    x,
                )
            return decoder_layer(layer, mixer, x, info)

        x = jax.checkpoint(run)(x) if remat else run(x)
        if i in capture:
            layer_out[i] = x
    return ForwardOut(model.norm(x), layer_out, gate_out)
