"""Llama-family decoder in Flax NNX, with one swappable token-mixing module per layer (softmax attention or DSLA)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dsla_jax.config import LlamaConfig
from dsla_jax.layers.attention import Attention
from dsla_jax.layers.context import MixerInputs
from dsla_jax.layers.mlp import SwiGLU
from dsla_jax.layers.norm import RMSNorm
from dsla_jax.layers.rope import inv_frequencies, rope_tables

Cache = dict[str, Any]  # {"index": [] int32, "valid": [B, S] bool, "layers": tuple of per-layer caches}


class DecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps=eps, dtype=dtype, param_dtype=param_dtype)
        # `self_attn` is the swappable token mixer: an `Attention` or a DSLA layer with the same call signature.
        self.self_attn = Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=eps, dtype=dtype, param_dtype=param_dtype)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # The mixer not in use: the original attention while DSLA runs (so it can be swapped back exactly), or the
        # trained DSLA layer while attention runs again.
        self.parked = nnx.data(None)

    def swap_mixer(self, new: nnx.Module | None = None) -> None:
        """Make `new` (or, when None, the parked mixer) the active mixer and park the current one."""
        new = self.parked if new is None else new
        if new is None:
            raise ValueError("no parked mixer to swap in")
        self.parked = nnx.data(self.self_attn)
        self.self_attn = new

    def __call__(self, x: jax.Array, info: MixerInputs, cache: Any = None) -> tuple[jax.Array, Any]:
        """x: [B, T, D] -> ([B, T, D], new layer cache)."""
        h, cache = self.self_attn(self.input_layernorm(x), info, cache)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class Llama(nnx.Module):
    """Llama causal LM. `dtype` is the compute dtype; parameters are kept in `param_dtype` (float32 by default)."""

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.layers = nnx.List(
            [
                DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for _ in range(config.num_hidden_layers)
            ]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = nnx.data(
            None
            if config.tie_word_embeddings
            else nnx.Linear(
                config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )
        )
        self.inv_freq = nnx.Variable(jnp.asarray(inv_frequencies(config)))
        if config.dsla_layers:
            from dsla_jax.models.hybrid import build_dsla

            for i in config.dsla_layers:
                self.layers[i].swap_mixer(build_dsla(self, i, rngs=rngs))

    # ---- cache -------------------------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int) -> Cache:
        """A cache for `batch` rows and `max_len` slots: KV caches for attention layers, states for DSLA layers."""
        return {
            "index": jnp.zeros((), jnp.int32),
            "valid": jnp.zeros((batch, max_len), bool),
            "layers": tuple(layer.self_attn.init_cache(batch, max_len) for layer in self.layers),
        }

    # ---- forward -----------------------------------------------------------------------------------------------
    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        valid: jax.Array | None = None,
        cache: Cache | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        """tokens [B, T] int -> (final hidden states [B, T, D] after the last norm, updated cache or None).

        positions [B, T] default to 0..T-1; valid [B, T] (False = padding) defaults to all True. With a cache, this
        call's tokens occupy slots cache["index"] .. cache["index"] + T - 1; the returned cache's index moves past them.
        """
        b, t = tokens.shape
        if valid is None:
            valid = jnp.ones((b, t), bool)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = rope_tables(self.inv_freq[...], positions)
        if cache is None:
            info = MixerInputs(positions, valid, cos, sin, jnp.zeros((), jnp.int32), None)
        else:
            kv_valid = jax.lax.dynamic_update_slice(cache["valid"], valid, (0, cache["index"]))
            info = MixerInputs(positions, valid, cos, sin, cache["index"], kv_valid)
        x = self.embed_tokens(tokens)
        new_layer_caches = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, info, None if cache is None else cache["layers"][i])
            new_layer_caches.append(c)
        x = self.norm(x)
        if cache is None:
            return x, None
        return x, {"index": cache["index"] + t, "valid": info.kv_valid, "layers": tuple(new_layer_caches)}

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> logits [..., V] in float32."""
        if self.lm_head is None:
            emb = self.embed_tokens.embedding[...].astype(self.dtype)
            return jnp.einsum("...d,vd->...v", hidden.astype(self.dtype), emb, preferred_element_type=jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)


def positions_from_valid(valid: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """RoPE positions for left-padded rows: valid [B, T] -> [B, T] int32, counting real tokens from `offset`."""
    return (offset + jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1).clip(min=0).astype(jnp.int32)
