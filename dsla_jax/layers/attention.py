"""Grouped-query softmax attention with RoPE and a preallocated KV cache."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dsla_jax.config import LlamaConfig
from dsla_jax.layers.context import MixerInputs
from dsla_jax.layers.rope import apply_rope

KVCache = dict[str, jax.Array]  # {"k": [B, S, Hk, D], "v": [B, S, Hk, D]}


QUERY_BLOCK = 512


def grouped_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float, block_q: int = QUERY_BLOCK
) -> jax.Array:
    """Softmax attention where H query heads share Hk key/value heads (query head h reads kv head h // (H // Hk)).

    q: [B, T, H, D]; k, v: [B, S, Hk, D]; mask: [B, T, S] bool (True = may attend) -> [B, T, H, D] in q's dtype.
    Scores and softmax in float32. A query row with no allowed key gets a finite (uniform) output, never NaN.
    Queries go in blocks of `block_q` (a `lax.map`), so scores take [B, H, block_q, S] at a time, not [B, H, T, S].
    """
    b, t, h, d = q.shape
    if t <= block_q:
        return _attend(q, k, v, mask, scale)
    n = -(-t // block_q)
    pad = n * block_q - t
    qb = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, block_q, h, d).swapaxes(0, 1)
    mb = jnp.pad(mask, ((0, 0), (0, pad), (0, 0))).reshape(b, n, block_q, -1).swapaxes(0, 1)
    out = jax.lax.map(lambda qm: _attend(qm[0], k, v, qm[1], scale), (qb, mb))
    return out.swapaxes(0, 1).reshape(b, n * block_q, h, d)[:, :t]


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    b, t, h, d = q.shape
    hk = k.shape[2]
    qg = q.reshape(b, t, hk, h // hk, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


class Attention(nnx.Module):
    """Llama self-attention: q/k/v/o projections without bias, RoPE on q and k, GQA."""

    kind = "attention"

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dtype = dtype
        d, hd = config.hidden_size, config.head_dim
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(d, self.num_heads * hd, **kw)
        self.k_proj = nnx.Linear(d, self.num_kv_heads * hd, **kw)
        self.v_proj = nnx.Linear(d, self.num_kv_heads * hd, **kw)
        self.o_proj = nnx.Linear(self.num_heads * hd, d, **kw)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        shape = (batch, max_len, self.num_kv_heads, self.head_dim)
        return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}

    def project_qkv(self, x: jax.Array, info: MixerInputs) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, D] -> q [B, T, H, hd], k, v [B, T, Hk, hd] with RoPE applied to q and k."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        return apply_rope(q, info.cos, info.sin), apply_rope(k, info.cos, info.sin), v

    def __call__(self, x: jax.Array, info: MixerInputs, cache: Any = None) -> tuple[jax.Array, Any]:
        """x: [B, T, D] -> ([B, T, D], new cache). Without a cache, attention is causal over this call's tokens."""
        b, t, _ = x.shape
        q, k, v = self.project_qkv(x, info)
        if cache is None:
            keys, values, key_valid = k, v, info.valid
            query_slot = jnp.arange(t)
        else:
            start = (0, info.cache_index, 0, 0)
            keys = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
            values = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
            cache = {"k": keys, "v": values}
            key_valid = info.kv_valid
            query_slot = info.cache_index + jnp.arange(t)
        key_slot = jnp.arange(keys.shape[1])
        mask = key_valid[:, None, :] & (key_slot[None, None, :] <= query_slot[None, :, None])
        out = grouped_attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask, scale=self.head_dim**-0.5)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), cache
