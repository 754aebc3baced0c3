"""DSLA parameter checkpoints: the trained DSLA layers of a hybrid, stored apart from the (unchanged) base model.

A directory holding
    dsla.safetensors    tensors `model.layers.{i}.self_attn.dsla.*` (HF layout: linear weights [out, in])
    dsla_config.json    {"dsla_layers": [...], "dsla_grouped": bool, "base_model": str, "base_config": {...}, ...}
    shared.safetensors  (optional) base-model tensors that training changed as well, HF names
`base_config` holds the architecture keys of the model the layers were trained on; loading onto another model fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from dsla_jax.checkpoints.errors import CheckpointError
from dsla_jax.checkpoints.hf import read_safetensors
from dsla_jax.config import LlamaConfig

PARAMS_FILE = "dsla.safetensors"
META_FILE = "dsla_config.json"
# Optional: base-model tensors (HF names) that training changed too, e.g. MLPs or norms of converted layers.
SHARED_FILE = "shared.safetensors"
_KEY = re.compile(r"model\.layers\.(\d+)\.self_attn\.dsla\.[A-Za-z0-9_.]+")
ARCH_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")


def layers_in(state_dict: Mapping[str, np.ndarray]) -> tuple[int, ...]:
    return tuple(sorted({int(m.group(1)) for k in state_dict if (m := _KEY.fullmatch(k))}))


def save_dsla_params(
    path: str | os.PathLike,
    state_dict: Mapping[str, np.ndarray],
    config: LlamaConfig,
    *,
    base_model: str,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write DSLA tensors + metadata into `path` (a directory), atomically."""
    path = Path(path)
    bad = [k for k in state_dict if not _KEY.fullmatch(k)]
    if bad:
        raise CheckpointError(f"not DSLA parameter names: {bad[:4]}")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise CheckpointError(f"{path} exists and is not empty (pass overwrite=True to replace it)")
    meta = {
        "dsla_layers": list(layers_in(state_dict)),
        "dsla_grouped": config.dsla_grouped,
        "base_model": base_model,
        "base_config": {k: getattr(config, k) for k in ARCH_KEYS},
        **(dict(extra) if extra else {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state_dict.items()}, str(tmp / PARAMS_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_dsla_params(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metadata, tensors) from a directory written by `save_dsla_params`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"DSLA checkpoint {path} does not exist")
    if not (path / PARAMS_FILE).is_file() or not (path / META_FILE).is_file():
        raise CheckpointError(f"{path} is not a DSLA checkpoint (needs {PARAMS_FILE} and {META_FILE})")
    try:
        meta = json.loads((path / META_FILE).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / META_FILE} is not valid JSON: {e}") from None
    tensors = read_safetensors(path / PARAMS_FILE)
    bad = [k for k in tensors if not _KEY.fullmatch(k)]
    if bad:
        raise CheckpointError(f"{path / PARAMS_FILE} holds tensors that are not DSLA parameters: {bad[:4]}")
    return meta, tensors


def load_shared_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The optional `shared.safetensors` of a DSLA checkpoint directory ({} when absent)."""
    shared = Path(path) / SHARED_FILE
    return read_safetensors(shared) if shared.is_file() else {}


def check_compatible(meta: Mapping[str, Any], config: LlamaConfig, source: object) -> None:
    """Raise CheckpointError when DSLA parameters were trained on a model of another architecture."""
    base = meta.get("base_config", {})
    diff = {k: (base[k], getattr(config, k)) for k in ARCH_KEYS if k in base and base[k] != getattr(config, k)}
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in diff.items())
        raise CheckpointError(f"DSLA checkpoint {source} was trained on a different model ({shown})")
