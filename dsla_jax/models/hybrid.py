"""Hybrid Llama: swap individual decoder layers between softmax attention and DSLA, in place.

    convert_to_dsla(model, i)          # layer i runs DSLA (fresh from its attention weights, or its parked DSLA)
    convert_to_attention(model, i)     # layer i runs its original attention again (bit-identical weights)

Both update `model.config.dsla_layers`. A jitted function closed over an old graph (e.g. a `Generator`) must be
refreshed after a swap.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from dsla_jax.layers.attention import Attention
from dsla_jax.layers.dsla import DSLA
from dsla_jax.models.llama import Llama


def _check_index(model: Llama, i: int) -> None:
    n = model.config.num_hidden_layers
    if not 0 <= i < n:
        raise ValueError(f"layer {i} out of range for a model with {n} layers")


def build_dsla(model: Llama, i: int, *, rngs: nnx.Rngs | None = None) -> DSLA:
    """A fresh DSLA layer initialised from layer i's attention weights (active or parked)."""
    layer = model.layers[i]
    attn = layer.self_attn if isinstance(layer.self_attn, Attention) else layer.parked
    if not isinstance(attn, Attention):
        raise ValueError(f"layer {i} has no attention weights to initialise DSLA from")
    return DSLA.from_attention(
        attn, model.config, grouped=model.config.dsla_grouped, rngs=rngs if rngs is not None else nnx.Rngs(1000 + i)
    )


def _set_layers(model: Llama) -> None:
    dsla = tuple(i for i, layer in enumerate(model.layers) if isinstance(layer.self_attn, DSLA))
    model.config = model.config.replace(dsla_layers=dsla)


def convert_to_dsla(model: Llama, i: int, params: dict[str, np.ndarray] | None = None, *, fresh: bool = False) -> DSLA:
    """Make layer i a DSLA layer and return it.

    params: DSLA tensors as `DSLA.extra_state_dict()` gives them (e.g. from a distillation checkpoint). Without them,
    a DSLA layer parked by an earlier `convert_to_attention` comes back (unless `fresh`), else a new one is built
    from the layer's attention weights.
    """
    _check_index(model, i)
    layer = model.layers[i]
    if isinstance(layer.self_attn, DSLA):
        dsla = layer.self_attn
    else:
        parked = layer.parked if isinstance(layer.parked, DSLA) and not fresh else None
        dsla = parked if parked is not None else build_dsla(model, i)
        layer.swap_mixer(dsla)
    if params is not None:
        dsla.load_extra_state_dict(params)
    _set_layers(model)
    return dsla


def convert_to_attention(model: Llama, i: int) -> None:
    """Make layer i a softmax-attention layer again, with its original weights; the DSLA layer is parked."""
    _check_index(model, i)
    layer = model.layers[i]
    if isinstance(layer.self_attn, Attention):
        return
    if not isinstance(layer.parked, Attention):
        raise ValueError(f"layer {i} has no original attention weights to restore")
    layer.swap_mixer()
    _set_layers(model)


def dsla_state_dict(model: Llama) -> dict[str, np.ndarray]:
    """Parameters of every active DSLA layer, named `model.layers.{i}.self_attn.dsla.*` (HF layout)."""
    out = {}
    for i, layer in enumerate(model.layers):
        if isinstance(layer.self_attn, DSLA):
            out.update(
                {f"model.layers.{i}.self_attn.dsla.{k}": v for k, v in layer.self_attn.extra_state_dict().items()}
            )
    return out


def load_dsla_state_dict(model: Llama, state_dict: dict[str, np.ndarray]) -> None:
    """Convert every layer named in `state_dict` (`model.layers.{i}.self_attn.dsla.*`) and load its parameters."""
    per_layer: dict[int, dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        if ".self_attn.dsla." not in key:
            continue
        head, name = key.split(".self_attn.dsla.", 1)
        per_layer.setdefault(int(head.rsplit(".", 1)[1]), {})[name] = value
    for i, params in sorted(per_layer.items()):
        convert_to_dsla(model, i, params)
