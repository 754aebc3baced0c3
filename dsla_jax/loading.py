"""Load a model and its tokenizer from a checkpoint spec (alias, HF directory or GGUF file), optionally as a hybrid."""

from __future__ import annotations

import argparse
from pathlib import Path

import jax.numpy as jnp

from dsla_jax.checkpoints import load_checkpoint
from dsla_jax.checkpoints.dsla_params import check_compatible, layers_in, load_dsla_params, load_shared_tensors
from dsla_jax.config import parse_layers
from dsla_jax.models.llama import Llama
from dsla_jax.models.weights import load_llama
from dsla_jax.tokenizer import Tokenizer, load_tokenizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_model(
    spec: str | Path,
    *,
    dtype: str = "float32",
    dsla_layers: str | None = None,
    dsla_params: str | Path | None = None,
    dsla_grouped: bool | None = None,
) -> tuple[Llama, Tokenizer]:
    """Load weights and tokenizer. `spec`: `smollm2-135m`, a HF directory, or a `.gguf` file.

    dsla_layers: a layer spec (see `dsla_jax.config.parse_layers`) of layers to run as DSLA; those without trained
    parameters start fresh from their attention weights. dsla_params: a DSLA checkpoint directory (from
    `train.distill` or `save_dsla_params`); its layers are converted with its parameters. A HF directory whose
    config.json lists `dsla_layers` loads as that hybrid already.
    """
    config, state_dict = load_checkpoint(str(spec))
    layers = set(config.dsla_layers) | set(parse_layers(dsla_layers, config.num_hidden_layers))
    grouped = config.dsla_grouped
    if dsla_params is not None:
        meta, tensors = load_dsla_params(dsla_params)
        check_compatible(meta, config, dsla_params)
        state_dict = {**state_dict, **load_shared_tensors(dsla_params), **tensors}
        layers |= set(layers_in(tensors))
        grouped = bool(meta.get("dsla_grouped", grouped))
    if dsla_grouped is not None:
        grouped = dsla_grouped
    config = config.replace(dsla_layers=tuple(sorted(layers)), dsla_grouped=grouped)
    model = load_llama(config, state_dict, dtype=parse_dtype(dtype))
    return model, load_tokenizer(str(spec))


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model-selection flags every command line shares."""
    p.add_argument("--model", default="smollm2-135m", help="alias, HF directory or .gguf file (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute dtype (default: %(default)s)")
    p.add_argument(
        "--dsla-layers",
        default=None,
        help="layers to run as DSLA: none, all, every-other, first:N, last:N, frac:F or a list like 0,2,5 "
        "(untrained unless --dsla-params holds them)",
    )
    p.add_argument("--dsla-params", default=None, help="a DSLA checkpoint directory (trained DSLA layers)")
    p.add_argument(
        "--dsla-layout",
        choices=["grouped", "expanded"],
        default=None,
        help="DSLA states per KV head (grouped) or per query head (expanded, as the original); default: checkpoint's",
    )


def load_from_args(args: argparse.Namespace) -> tuple[Llama, Tokenizer]:
    grouped = None if args.dsla_layout is None else args.dsla_layout == "grouped"
    return load_model(
        args.model, dtype=args.dtype, dsla_layers=args.dsla_layers, dsla_params=args.dsla_params, dsla_grouped=grouped
    )
