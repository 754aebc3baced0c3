"""Pure linear-attention ops (no Flax modules): gated linear attention (GLA) and dual-state linear attention (DSLA).

Layout everywhere: q [B, T, H, K], k and gates [B, T, Hk, K], v [B, T, Hk, V], states [B, Hk, K, V] float32.
"""

from dsla_jax.ops.dsla import dsla_attention, dsla_decode_step
from dsla_jax.ops.gla import gla_attention, gla_decode_step

__all__ = ["dsla_attention", "dsla_decode_step", "gla_attention", "gla_decode_step"]
