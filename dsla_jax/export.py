"""Export a model (any checkpoint dsla-jax loads, DSLA layers included) to a Hugging Face directory.

    python -m dsla_jax.export --model smollm2-135m --out smollm2-hf [--overwrite]

The directory holds `config.json`, `model.safetensors` and the tokenizer files; transformers' LlamaForCausalLM loads
it (DSLA parameters, stored under `model.layers.{i}.self_attn.dsla.*`, are ignored by transformers and read back by
dsla-jax).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsla_jax.checkpoints import CheckpointError, save_hf
from dsla_jax.models.llama import Llama
from dsla_jax.models.weights import llama_state_dict
from dsla_jax.tokenizer import Tokenizer


def export_hf(model: Llama, tokenizer: Tokenizer | None, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write `model` (+ tokenizer files) as a HF safetensors directory; nothing is left half-written on failure."""
    files = tokenizer.to_files() if tokenizer is not None else None
    return save_hf(out, model.config, llama_state_dict(model), tokenizer_dir_files=files, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsla_jax.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="alias, HF directory or .gguf file")
    ap.add_argument("--out", type=Path, required=True, help="target directory (must be empty or absent)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty target directory")
    args = ap.parse_args(argv)
    from dsla_jax.loading import load_model

    try:
        model, tok = load_model(args.model)
        path = export_hf(model, tok, args.out, overwrite=args.overwrite)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
