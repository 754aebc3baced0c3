"""The DSLA token mixer: dual-state gated linear attention, a drop-in replacement for a Llama attention layer.

Per key/value head, two gated-linear-attention states S1, S2 [Dk, Dv] (float32):
    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,   o_t = q_t S_t / sqrt(Dk),
    g^(i)_t = max(logsigmoid(x_t W_i + b_i) / 16, -50),
    y_t = o_proj(w_1 o^(1)_t + w_2 o^(2)_t),    (w_1, w_2) = softmax(alpha).
No RoPE, no feature map. q/k/v/o start from the Llama layer's weights; W_1 starts as the identity (for a key width
smaller than the hidden size: the identity's first columns), W_2 as a default dense init, biases at 0, alpha at 0.

`grouped=True` keeps one pair of states per KV head (H / Hk query heads read each: smaller state, less decode
traffic); `grouped=False` repeats the K/V weights to every query head, as the original DSLA does.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsla_jax.config import LlamaConfig
from dsla_jax.layers.attention import Attention
from dsla_jax.layers.context import MixerInputs
from dsla_jax.ops.dsla import dsla_attention, dsla_decode_step

GATE_DIVISOR = 16.0
GATE_CLAMP = -50.0

DSLACache = dict[str, jax.Array]  # {"s1": [B, Hkv, Dk, Dv], "s2": [B, Hkv, Dk, Dv]} float32


def log_gate(pre: jax.Array) -> jax.Array:
    """Pre-activation [..., K] -> per-channel log forget gate max(logsigmoid(pre) / 16, -50) in float32."""
    return jnp.maximum(jax.nn.log_sigmoid(pre.astype(jnp.float32)) / GATE_DIVISOR, GATE_CLAMP)


class DSLA(nnx.Module):
    kind = "dsla"

    def __init__(
        self,
        config: LlamaConfig,
        *,
        grouped: bool = True,
        impl: str = "auto",
        chunk_size: int = 64,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads if grouped else config.num_attention_heads
        self.head_dim = config.head_dim
        self.grouped = grouped
        self.impl = impl
        self.chunk_size = chunk_size
        self.dtype = dtype
        d, hd = config.hidden_size, config.head_dim
        key_dim = self.num_kv_heads * hd
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(d, self.num_heads * hd, use_bias=False, **kw)
        self.k_proj = nnx.Linear(d, key_dim, use_bias=False, **kw)
        self.v_proj = nnx.Linear(d, key_dim, use_bias=False, **kw)
        self.o_proj = nnx.Linear(self.num_heads * hd, d, use_bias=False, **kw)
        identity = lambda key, shape, dtype=jnp.float32: jnp.eye(*shape, dtype=dtype)  # noqa: ARG005
        self.g1_proj = nnx.Linear(d, key_dim, use_bias=True, kernel_init=identity, **kw)
        self.g2_proj = nnx.Linear(d, key_dim, use_bias=True, **kw)
        self.alpha = nnx.Param(jnp.zeros((2,), param_dtype))
        # Output gain exp(log_scale), 1 at init. Calibration (training) sets it so that a fresh layer's output RMS
        # matches the attention's (often 1e-3 .. 1e-2): kept as a log-gain, an optimizer step changes it by a
        # relative amount, and o_proj keeps the attention's weights at their own scale.
        self.log_scale = nnx.Param(jnp.zeros((1,), param_dtype))

    # ---- construction from an attention layer -------------------------------------------------------------------
    @classmethod
    def from_attention(
        cls, attn: Attention, config: LlamaConfig, *, grouped: bool = True, rngs: nnx.Rngs, **kw: Any
    ) -> DSLA:
        """DSLA whose q/k/v/o projections copy `attn`'s (K/V repeated to every query head when not grouped)."""
        layer = cls(config, grouped=grouped, dtype=attn.dtype, rngs=rngs, **kw)
        layer.q_proj.kernel.set_value(attn.q_proj.kernel.get_value())
        layer.o_proj.kernel.set_value(attn.o_proj.kernel.get_value())
        for name in ("k_proj", "v_proj"):
            w = getattr(attn, name).kernel.get_value()
            if not grouped:
                groups = config.num_attention_heads // config.num_key_value_heads
                w = jnp.repeat(w.reshape(w.shape[0], config.num_key_value_heads, 1, -1), groups, axis=2)
                w = w.reshape(w.shape[0], -1)
            getattr(layer, name).kernel.set_value(w)
        return layer

    def init_cache(self, batch: int, max_len: int) -> DSLACache:  # noqa: ARG002 - O(1) state, no length
        shape = (batch, self.num_kv_heads, self.head_dim, self.head_dim)
        return {"s1": jnp.zeros(shape, jnp.float32), "s2": jnp.zeros(shape, jnp.float32)}

    def mix(self) -> jax.Array:
        """(w_1, w_2) = softmax(alpha), float32 [2]."""
        return jax.nn.softmax(self.alpha[...].astype(jnp.float32))

    def gates(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D] -> (g1, g2), each [B, T, Hkv, Dk] float32 log gates."""
        b, t, _ = x.shape
        shape = (b, t, self.num_kv_heads, self.head_dim)
        return log_gate(self.g1_proj(x)).reshape(shape), log_gate(self.g2_proj(x)).reshape(shape)

    def __call__(self, x: jax.Array, info: MixerInputs, cache: DSLACache | None = None) -> tuple[jax.Array, Any]:
        """x: [B, T, D] -> ([B, T, D], new cache). Padding tokens (info.valid False) leave the states unchanged."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        g1, g2 = self.gates(x)
        keep = info.valid[:, :, None, None]
        k, v = jnp.where(keep, k, 0), jnp.where(keep, v, 0)
        g1, g2 = jnp.where(keep, g1, 0.0), jnp.where(keep, g2, 0.0)
        mix = self.mix()
        state = None if cache is None else (cache["s1"], cache["s2"])
        if cache is not None and t == 1:
            o, (s1, s2) = dsla_decode_step(q[:, 0], k[:, 0], v[:, 0], g1[:, 0], g2[:, 0], mix, state)
            o = o[:, None]
        else:
            o, (s1, s2) = dsla_attention(
                q, k, v, g1, g2, mix, initial_state=state, chunk_size=self.chunk_size, impl=self.impl
            )
        gain = jnp.exp(self.log_scale[...].astype(jnp.float32))
        y = self.o_proj((o.astype(jnp.float32) * gain).astype(self.dtype).reshape(b, t, self.num_heads * self.head_dim))
        return y, (None if cache is None else {"s1": s1, "s2": s2})

    # ---- parameters as a flat, HF-style dict (for checkpoints) --------------------------------------------------
    def _params(self) -> dict[str, tuple[nnx.Variable, bool]]:
        out = {f"{n}.weight": (getattr(self, n).kernel, True) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        for n in ("g1_proj", "g2_proj"):
            out[f"{n}.weight"] = (getattr(self, n).kernel, True)
            out[f"{n}.bias"] = (getattr(self, n).bias, False)
        out["alpha"] = (self.alpha, False)
        out["log_scale"] = (self.log_scale, False)
        return out

    # Tensors that checkpoints written before they existed lack: loaded as their initial value.
    OPTIONAL = {"log_scale": 0.0}

    def extra_state_dict(self) -> dict[str, np.ndarray]:
        """DSLA parameters, HF layout ([out, in] for linears), float32 numpy."""
        out = {}
        for name, (var, transposed) in self._params().items():
            arr = np.asarray(jax.device_get(var.get_value()), np.float32)
            out[name] = arr.T.copy() if transposed else arr
        return out

    def load_extra_state_dict(self, params: dict[str, np.ndarray]) -> None:
        """Inverse of `extra_state_dict`; ValueError naming the tensor on a missing key or a shape mismatch."""
        for name, (var, transposed) in self._params().items():
            if name not in params and name in self.OPTIONAL:
                var.set_value(jnp.full(var.get_value().shape, self.OPTIONAL[name], var.get_value().dtype))
                continue
            if name not in params:
                raise ValueError(f"DSLA parameters have no tensor {name!r}")
            arr = np.asarray(params[name], np.float32)
            expected = tuple(var.get_value().shape)
            expected = expected[::-1] if transposed else expected  # HF layout
            if arr.shape != expected:
                raise ValueError(f"DSLA tensor {name!r} has shape {arr.shape}, layer expects {expected}")
            var.set_value(jnp.asarray(arr.T if transposed else arr, var.get_value().dtype))
