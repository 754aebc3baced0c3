"""What every token-mixing layer (softmax attention or DSLA) receives besides its input activations."""

from __future__ import annotations

from dataclasses import dataclass

import jax


@jax.tree_util.register_dataclass
@dataclass
class MixerInputs:
    """Per-call token metadata shared by all layers of one forward pass.

    positions: [B, T] int32 RoPE positions (a left-padded row counts from its first real token).
    valid:     [B, T] bool, True for real tokens, False for padding.
    cos, sin:  [B, T, head_dim] float32 RoPE tables for `positions`.
    cache_index: [] int32, the first cache slot this call writes (0 when there is no cache).
    kv_valid:  [B, S] bool validity of every cache slot after this call's tokens are written, or None without cache.
    """

    positions: jax.Array
    valid: jax.Array
    cos: jax.Array
    sin: jax.Array
    cache_index: jax.Array
    kv_valid: jax.Array | None
