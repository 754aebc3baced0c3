"""Load a model and its tokenizer from a checkpoint spec (alias, HF directory or GGUF file)."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from dsla_jax.checkpoints import load_checkpoint
from dsla_jax.models.llama import Llama
from dsla_jax.models.weights import load_llama
from dsla_jax.tokenizer import Tokenizer, load_tokenizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_model(spec: str | Path, *, dtype: str = "float32") -> tuple[Llama, Tokenizer]:
    """Load weights and tokenizer. `spec`: `smollm2-135m`, a HF directory, or a `.gguf` file."""
    config, state_dict = load_checkpoint(str(spec))
    model = load_llama(config, state_dict, dtype=parse_dtype(dtype))
    return model, load_tokenizer(str(spec))
