"""Run checkpoints (Orbax) and the distilled output.

Run checkpoints live in `<out_dir>/checkpoints/<global step>/` with two items: `state` (trained parameters as a flat
dictionary, optimizer state) and `meta` (JSON: chain position, data-iterator position, model fingerprint, plan,
evaluations so far, config). Orbax writes each one to a temporary folder and renames it when complete, so a kill never
leaves a checkpoint that restores half-written.

The distilled output (`<out_dir>/final/`, and `<out_dir>/stages/<n>_layers/` per stage) is a DSLA parameter
checkpoint (`dsla_jax.checkpoints.dsla_params`), which every CLI loads with `--model <base> --dsla-params <dir>`:
    dsla.safetensors    DSLA tensors `model.layers.{i}.self_attn.dsla.*`
    dsla_config.json    DSLA layer list, base model spec and architecture, plus: conversion order, mixer, training
                        tokens, evaluations, the run's config
    shared.safetensors  (only when MLPs / norms were trained) those tensors, HF names
    hf/                 (final only, `checkpoint.export_hf`) the whole hybrid as a Hugging Face directory
                        (`--model <out_dir>/final/hf` alone loads it).
`load_distilled(dir)` rebuilds the hybrid from the base model and these files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import save_file

from dsla_jax.checkpoints.dsla_params import SHARED_FILE, load_dsla_params, save_dsla_params
from dsla_jax.config import LlamaConfig
from dsla_jax.loading import load_model
from dsla_jax.models.llama import Llama
from dsla_jax.tokenizer import Tokenizer

FORMAT = 1


class CheckpointMismatch(ValueError):
    """A checkpoint written for another model, another chain, or other data than this run's."""


# ---- model identity ----------------------------------------------------------------------------------------------


def model_fingerprint(config: LlamaConfig, state_dict: dict[str, np.ndarray]) -> dict[str, Any]:
    """Architecture keys + a hash of a few weight tensors: tells models apart that share an architecture."""
    arch = config.replace(dsla_layers=()).to_hf_dict()
    h = hashlib.sha256()
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.weight"):
        if name in state_dict:
            h.update(np.ascontiguousarray(np.asarray(state_dict[name], np.float32)[:64]).tobytes())
    return {"config": arch, "weights": h.hexdigest()[:16]}


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Raise CheckpointMismatch naming the differing architecture keys (or the weights) of two fingerprints."""
    a, b = saved.get("config", {}), current["config"]
    diff = [
        f"{k}: checkpoint {a.get(k)!r}, this run {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
    ]
    if diff:
        raise CheckpointMismatch(f"{where} was written for a different model ({'; '.join(diff[:4])})")
    if saved.get("weights") != current["weights"]:
        raise CheckpointMismatch(f"{where} was written for a different model (same architecture, different weights)")


# ---- run checkpoints ---------------------------------------------------------------------------------------------


class RunCheckpoints:
    """Orbax CheckpointManager over `<out_dir>/checkpoints`, keeping the newest `keep`."""

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Save (asynchronously) the state pytree and the JSON meta under `step`."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)

    def read_meta(self, step: int) -> dict[str, Any]:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if meta.get("format") != FORMAT:
            raise CheckpointMismatch(f"{self.directory / str(step)}: unknown checkpoint format {meta.get('format')!r}")
        return meta

    def restore_state(self, step: int, target: dict[str, Any]) -> dict[str, Any]:
        """Restore into the structure, dtypes and shardings of `target` (arrays or ShapeDtypeStructs)."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target
        )
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except (ValueError, KeyError) as e:
            raise CheckpointMismatch(
                f"{self.directory / str(step)}: its parameters do not fit this run's student ({e})"
            ) from e
        return out["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


# ---- distilled output ----------------------------------------------------------------------------------------------


def write_distilled(
    directory: str | Path,
    config: LlamaConfig,
    dsla_tensors: dict[str, np.ndarray],
    *,
    base_model: str,
    shared_tensors: dict[str, np.ndarray] | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """A DSLA parameter checkpoint (`dsla_jax.checkpoints.dsla_params` format: `dsla.safetensors` +
    `dsla_config.json`, with `info` added to the JSON), plus `shared.safetensors` for trained MLP / norm tensors."""
    directory = save_dsla_params(directory, dsla_tensors, config, base_model=base_model, extra=info, overwrite=True)
    if shared_tensors:
        save_file(
            {k: np.ascontiguousarray(v, np.float32) for k, v in shared_tensors.items()}, str(directory / SHARED_FILE)
        )
    return directory


def load_distilled(directory: str | Path, *, dtype: str = "float32") -> tuple[Llama, Tokenizer]:
    """The hybrid a distillation wrote to `directory` (its base model + DSLA tensors + shared tensors, if any)."""
    meta, _ = load_dsla_params(directory)
    return load_model(meta["base_model"], dtype=dtype, dsla_params=directory)
