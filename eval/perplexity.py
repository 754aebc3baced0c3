"""Perplexity of a model on a text file over non-overlapping windows.

python -m eval.perplexity --model smollm2-135m --text FILE [--window 512] [--max-tokens N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dsla_jax.data.builtin import resolve_text
from dsla_jax.loading import add_model_args, load_from_args
from dsla_jax.metrics import perplexity


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eval.perplexity", description="Perplexity over non-overlapping windows."
    )
    add_model_args(p)
    p.add_argument("--text", required=True, help="UTF-8 text file, or builtin:NAME (e.g. builtin:hamlet)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens of the text")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--compare-hf", action="store_true", help="also run transformers (torch) on the same token ids")
    p.add_argument("--json", type=Path, help="write the result here as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        text = resolve_text(args.text).read_text(encoding="utf-8")
        model, tok = load_from_args(args)
        ids = tok.encode(text, add_bos=False)
        if args.max_tokens is not None:
            ids = ids[: args.max_tokens]
        result = perplexity(model, ids, window=args.window, batch_size=args.batch_size)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    result.update({"model": str(args.model), "text": str(args.text), "window": args.window, "dtype": args.dtype})
    result["dsla_layers"] = list(model.config.dsla_layers)
    print(f"perplexity {result['ppl']:.4f} over {result['tokens']} predicted tokens in {result['windows']} windows")
    if args.compare_hf:
        from eval.hf_reference import hf_perplexity, load_hf_model

        ref = hf_perplexity(load_hf_model(args.model), ids, window=args.window)
        result["transformers"] = ref
        result["ratio_to_transformers"] = result["ppl"] / ref["ppl"]
        print(f"transformers perplexity {ref['ppl']:.4f} on the same ids; ratio {result['ratio_to_transformers']:.5f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
