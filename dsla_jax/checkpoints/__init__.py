"""Checkpoint I/O: Hugging Face safetensors directories and llama.cpp GGUF files <-> float32 Llama state dicts."""

from dsla_jax.checkpoints.errors import CheckpointError
from dsla_jax.checkpoints.gguf import load_gguf
from dsla_jax.checkpoints.hf import check_state_dict, llama_shapes, load_hf_dir, save_hf
from dsla_jax.checkpoints.resolve import load_checkpoint, resolve_model_path

__all__ = [
    "CheckpointError",
    "check_state_dict",
    "llama_shapes",
    "load_checkpoint",
    "load_gguf",
    "load_hf_dir",
    "resolve_model_path",
    "save_hf",
]
