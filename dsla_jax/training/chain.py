"""The conversion chain: which layers become DSLA and in what order, the student built from the teacher, and hybrids.

Chain step k makes layer order[k] a DSLA layer (initialised from its attention weights) and trains it with the
layers order[:k] already converted. The student holds every chain layer as DSLA from the start, with its original
attention parked beside it; `active_mask(k)` decides which of them run DSLA at step k, so the structure (and the
compiled step) never changes. Stages are the converted-layer counts at which a hybrid is evaluated and exported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsla_jax.layers.dsla import DSLA
from dsla_jax.models.hybrid import convert_to_attention, convert_to_dsla
from dsla_jax.models.llama import Llama
from dsla_jax.training.config import ChainSection, DistillConfigError, ModelSection
from dsla_jax.training.params import Flat, merge

# Mixing logits of the single-state ablation: softmax([20, -20]) = (1, 4e-18), the second state is switched off.
SINGLE_STATE_ALPHA = (20.0, -20.0)


@dataclass(frozen=True)
class ChainPlan:
    order: tuple[int, ...]  # conversion order (at least as long as the chain)
    stages: tuple[int, ...]  # converted-layer counts at which hybrids are evaluated / exported, increasing
    num_layers: int

    @property
    def length(self) -> int:
        return self.stages[-1]

    @property
    def chain_layers(self) -> tuple[int, ...]:
        """The layers converted by the end of the chain, in order."""
        return self.order[: self.length]

    def active_mask(self, k: int) -> np.ndarray:
        """[L] bool: the layers that run DSLA during chain step k (order[:k+1])."""
        mask = np.zeros(self.num_layers, bool)
        mask[list(self.order[: k + 1])] = True
        return mask

    def train_mask(self, k: int, train_previous: bool) -> np.ndarray:
        """[L] bool: the layers whose parameters move during chain step k."""
        if train_previous:
            return self.active_mask(k)
        mask = np.zeros(self.num_layers, bool)
        mask[self.order[k]] = True
        return mask


def stage_counts(stages: tuple[float, ...], num_layers: int) -> tuple[int, ...]:
    """Stage values -> layer counts: a value < 1 is a fraction of the layers (rounded half up), >= 1 a count."""
    counts = []
    for s in stages:
        if s < 1:
            n = max(1, math.floor(s * num_layers + 0.5))
        else:
            if s != int(s):
                raise DistillConfigError(f"chain.stages: {s:g} is neither a fraction (< 1) nor a whole layer count")
            n = int(s)
        if n > num_layers:
            raise DistillConfigError(f"chain.stages: {s:g} asks for {n} layers, but the model has {num_layers}")
        counts.append(n)
    return tuple(sorted(set(counts)))


def check_layers(layers: tuple[int, ...] | list[int], num_layers: int, key: str = "chain.layers") -> None:
    bad = [i for i in layers if not 0 <= int(i) < num_layers]
    if bad:
        raise DistillConfigError(
            f"{key} names layer {bad[0]}, but the model has {num_layers} layers (0..{num_layers - 1})"
        )


def make_plan(cfg: ChainSection, num_layers: int, order: tuple[int, ...] | list[int]) -> ChainPlan:
    """Validate an order (any length >= the last stage) against the model and the stages."""
    order = tuple(int(i) for i in order)
    check_layers(order, num_layers)
    counts = stage_counts(cfg.stages, num_layers)
    if len(order) < counts[-1]:
        raise DistillConfigError(
            f"chain.layers lists {len(order)} layers, but chain.stages converts up to {counts[-1]}"
        )
    return ChainPlan(order, counts, num_layers)


# ---- student -----------------------------------------------------------------------------------------------------


def configure_dsla(layer: DSLA, cfg: ModelSection) -> None:
    """Apply the config's op choice (and the single-state ablation's mixing weights) to a DSLA layer."""
    layer.impl = cfg.dsla_impl
    layer.chunk_size = cfg.dsla_chunk_size
    if cfg.mixer == "gla":
        layer.alpha.set_value(jnp.asarray(SINGLE_STATE_ALPHA, layer.alpha.get_value().dtype))


def build_student(teacher: Llama, layers: tuple[int, ...], cfg: ModelSection) -> Llama:
    """A copy of `teacher` (sharing its arrays) whose `layers` are DSLA, freshly converted from their attention."""
    student = nnx.clone(teacher)
    for i in layers:
        configure_dsla(convert_to_dsla(student, i, fresh=True), cfg)
    return student


def make_hybrid(
    student_graph: nnx.GraphDef, trainable: Flat, frozen: Flat, layers: tuple[int, ...] | list[int]
) -> Llama:
    """A real hybrid `Llama` from the student's (trained) parameters with exactly `layers` running DSLA.

    The other chain layers get their original attention back (`convert_to_attention`); its `config.dsla_layers`,
    `dsla_state_dict` and `llama_state_dict` then describe the hybrid as `dsla_jax.generate` / export load it.
    """
    model = merge(student_graph, trainable, frozen)
    keep = set(int(i) for i in layers)
    for i in model.config.dsla_layers:
        if i not in keep:
            convert_to_attention(model, i)
    return model


def trained_shared_keys(state_dict: dict[str, np.ndarray], layers: tuple[int, ...], cfg: ChainSection) -> list[str]:
    """HF names of the MLP / norm tensors the config trains for `layers` (empty by default)."""
    parts = (("mlp.",) if cfg.train_mlp else ()) + (
        ("input_layernorm.", "post_attention_layernorm.") if cfg.train_norms else ()
    )
    prefixes = tuple(f"model.layers.{i}.{p}" for i in layers for p in parts)
    return sorted(k for k in state_dict if prefixes and k.startswith(prefixes))
