"""Model state as flat dictionaries keyed by dotted paths (`layers.3.self_attn.q_proj.kernel`), and which are trained.

Flat dictionaries are what the train step, the optimizer, the partition rules and Orbax see; `merge` turns them back
into a module inside a jitted function. A student's trainable set is fixed for the whole chain (every chain layer's
DSLA parameters, plus its MLP / norms when configured); which of them move at a given chain step is a per-layer
boolean mask (`layer_index`), so the compiled step never changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
from flax import nnx

Flat = dict[str, jax.Array]

SEP = "."


def path_key(path: tuple) -> str:
    return SEP.join(str(p) for p in path)


def _path_tuple(key: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in key.split(SEP))


def flatten(state: nnx.State) -> Flat:
    """An nnx.State -> {dotted path: array}."""
    return {path_key(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def unflatten(*flats: Flat) -> nnx.State:
    """Flat dictionaries (disjoint keys) -> one nnx.State of plain arrays, ready for `nnx.merge`."""
    items = [(_path_tuple(k), v) for flat in flats for k, v in flat.items()]
    return nnx.from_flat_state(items)


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, Flat]:
    graphdef, state = nnx.split(model)
    return graphdef, flatten(state)


def merge(graphdef: nnx.GraphDef, *flats: Flat) -> nnx.Module:
    return nnx.merge(graphdef, unflatten(*flats))


def layer_index(key: str) -> int | None:
    """The decoder layer a parameter belongs to (`layers.{i}.…`), or None (embeddings, final norm, lm_head)."""
    parts = key.split(SEP)
    return int(parts[1]) if len(parts) > 1 and parts[0] == "layers" and parts[1].isdigit() else None


# Parameters of a DSLA layer that only the second state uses: frozen in the single-state (GLA) ablation.
SECOND_STATE = ("g2_proj", "alpha")


def trainable_filter(
    chain_layers: Iterable[int], *, mlp: bool = False, norms: bool = False, single_state: bool = False
) -> Callable[[str], bool]:
    """Predicate on dotted paths: the chain layers' DSLA parameters (`self_attn.*`), plus MLP / norms if asked."""
    layers = set(int(i) for i in chain_layers)
    parts = (
        {"self_attn"}
        | ({"mlp"} if mlp else set())
        | ({"input_layernorm", "post_attention_layernorm"} if norms else set())
    )

    def keep(key: str) -> bool:
        i = layer_index(key)
        if i not in layers:
            return False
        rest = key.split(SEP)[2:]
        if single_state and len(rest) > 1 and rest[0] == "self_attn" and rest[1] in SECOND_STATE:
            return False
        return bool(rest) and rest[0] in parts

    return keep


def partition(flat: Flat, keep: Callable[[str], bool]) -> tuple[Flat, Flat]:
    """(entries where keep(key), the rest)."""
    return {k: v for k, v in flat.items() if keep(k)}, {k: v for k, v in flat.items() if not keep(k)}


def mask_by_layer(tree: Flat, layer_on: jax.Array) -> Flat:
    """Zero every entry whose layer is off: layer_on [L] bool; entries outside the layers are left as they are."""
    out = {}
    for k, v in tree.items():
        i = layer_index(k)
        out[k] = v if i is None else jnp.where(layer_on[i], v, jnp.zeros_like(v))
    return out


def cast_floats(flat: Flat, dtype) -> Flat:
    return {k: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v for k, v in flat.items()}
