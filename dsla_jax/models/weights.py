"""Move weights between a `Llama` module and a Hugging Face-named state dict (`dict[str, np.ndarray]`).

HF stores linear weights as [out, in]; Flax `nnx.Linear` kernels are [in, out]. DSLA parameters live under
`model.layers.{i}.self_attn.dsla.*` and are handled by the DSLA layer itself (`state_dict_items` / `load_items`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsla_jax.config import LlamaConfig
from dsla_jax.layers.attention import Attention
from dsla_jax.layers.rope import inv_frequencies
from dsla_jax.models.llama import Llama

_LINEARS = {
    "self_attn.q_proj": ("self_attn", "q_proj"),
    "self_attn.k_proj": ("self_attn", "k_proj"),
    "self_attn.v_proj": ("self_attn", "v_proj"),
    "self_attn.o_proj": ("self_attn", "o_proj"),
    "mlp.gate_proj": ("mlp", "gate_proj"),
    "mlp.up_proj": ("mlp", "up_proj"),
    "mlp.down_proj": ("mlp", "down_proj"),
}
_NORMS = ("input_layernorm", "post_attention_layernorm")


def _named_params(model: Llama) -> dict[str, tuple[nnx.Variable, bool]]:
    """HF name -> (the module's variable, whether HF stores it transposed)."""
    out: dict[str, tuple[nnx.Variable, bool]] = {"model.embed_tokens.weight": (model.embed_tokens.embedding, False)}
    out["model.norm.weight"] = (model.norm.weight, False)
    if model.lm_head is not None:
        out["lm_head.weight"] = (model.lm_head.kernel, True)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        for name in _NORMS:
            out[p + name + ".weight"] = (getattr(layer, name).weight, False)
        # the attention weights of a DSLA layer are its parked original attention
        attn = layer.self_attn if isinstance(layer.self_attn, Attention) else layer.parked
        mods = {"self_attn": attn, "mlp": layer.mlp}
        for hf, (parent, child) in _LINEARS.items():
            out[p + hf + ".weight"] = (getattr(mods[parent], child).kernel, True)
    return out


def load_llama(
    config: LlamaConfig, state_dict: dict[str, np.ndarray], *, dtype=jnp.float32, param_dtype=jnp.float32
) -> Llama:
    """Build a `Llama` from a HF-named float32 state dict without random init.

    Layers in `config.dsla_layers` become DSLA: with the `model.layers.{i}.self_attn.dsla.*` tensors when the state
    dict has them, else freshly initialised from the layer's attention weights.
    Raises ValueError naming the tensor when one is missing or has the wrong shape.
    """
    base = config.replace(dsla_layers=())
    model = nnx.eval_shape(lambda: Llama(base, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    model.inv_freq.set_value(jnp.asarray(inv_frequencies(config)))
    for name, (var, transposed) in _named_params(model).items():
        if name not in state_dict:
            raise ValueError(f"checkpoint has no tensor {name!r}")
        arr = np.asarray(state_dict[name])
        if transposed:
            arr = arr.T
        expected = tuple(var.get_value().shape)
        if arr.shape != expected:
            shown = arr.T.shape if transposed else arr.shape
            raise ValueError(
                f"tensor {name!r} has shape {shown}, config expects {expected[::-1] if transposed else expected}"
            )
        var.set_value(jnp.asarray(arr, dtype=param_dtype))
    if config.dsla_layers:
        from dsla_jax.models.hybrid import convert_to_dsla
    for i in config.dsla_layers:
        prefix = f"model.layers.{i}.self_attn.dsla."
        params = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        convert_to_dsla(model, i, params or None)
    return model


def llama_state_dict(model: Llama) -> dict[str, np.ndarray]:
    """The model's weights as a HF-named float32 state dict (DSLA parameters included under `...self_attn.dsla.*`)."""
    out = {
        name: np.asarray(jax.device_get(var.get_value()), dtype=np.float32).T.copy()
        if transposed
        else np.asarray(jax.device_get(var.get_value()), dtype=np.float32)
        for name, (var, transposed) in _named_params(model).items()
    }
    if model.config.dsla_layers:
        from dsla_jax.models.hybrid import dsla_state_dict

        out.update(dsla_state_dict(model))
    return out
