"""Prefill and decode speed of dsla-jax next to Hugging Face transformers' `generate` on the same prompt.

    python -m eval.speed --model smollm2-135m [--prompt-tokens 512] [--new-tokens 64] [--batch 1] [--json OUT]

Greedy decoding, float32, the same token ids on both sides. JAX is warmed up (compiled) before timing; each side is
timed `--repeats` times and the median is reported. A benchmark, not a test: it prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

from dsla_jax.data.builtin import resolve_text
from dsla_jax.generate import Generator, SamplingParams
from dsla_jax.loading import add_model_args, load_from_args
from eval.hf_reference import load_hf_model


def time_hf(hf, ids: np.ndarray, new_tokens: int, repeats: int) -> dict:
    import torch

    x = torch.as_tensor(ids, dtype=torch.long)
    prefill, total, out = [], [], None
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            hf(x, use_cache=True, logits_to_keep=1)
            prefill.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = hf.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            total.append(time.perf_counter() - t0)
    p, t = statistics.median(prefill), statistics.median(total)
    b = ids.shape[0]
    return {
        "prefill_s": p,
        "prefill_tokens_per_s": ids.size / p,
        "decode_tokens_per_s": b * (new_tokens - 1) / max(t - p, 1e-9),
        "tokens": out[:, ids.shape[1] :].tolist(),
    }


def time_jax(gen: Generator, ids: np.ndarray, new_tokens: int, repeats: int) -> dict:
    params = SamplingParams(max_new_tokens=new_tokens, greedy=True)
    prompts = ids.tolist()
    gen.generate(prompts, params)  # compile
    runs = [gen.generate(prompts, params) for _ in range(repeats)]
    p = statistics.median(r.prefill_s for r in runs)
    d = statistics.median(r.decode_s for r in runs)
    steps = runs[0].decode_steps
    return {
        "prefill_s": p,
        "prefill_tokens_per_s": ids.size / p,
        # the decode loop samples the first token from the prefill logits and runs steps - 1 forward passes
        "decode_tokens_per_s": ids.shape[0] * (steps - 1) / d,
        "tokens": runs[0].tokens,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.speed", description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--text", default="builtin:hamlet", help="where the prompt tokens come from")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    model, tok = load_from_args(args)
    ids = tok.encode(resolve_text(args.text).read_text(encoding="utf-8"))
    need = args.prompt_tokens * args.batch
    if len(ids) < need:
        raise SystemExit(f"error: the text has {len(ids)} tokens, {need} needed")
    ids = np.asarray(ids[:need], np.int64).reshape(args.batch, args.prompt_tokens)
    name = f"dsla-jax ({len(model.config.dsla_layers)} DSLA layers)"
    rows = {name: time_jax(Generator(model), ids, args.new_tokens, args.repeats)}
    if not args.no_hf:
        rows["transformers generate (torch)"] = time_hf(load_hf_model(args.model), ids, args.new_tokens, args.repeats)
    print(
        f"\nB={args.batch} prompt={args.prompt_tokens} new={args.new_tokens} float32 greedy, "
        f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()})"
    )
    print(f"{'engine':34s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
    for name, r in rows.items():
        print(f"{name:34s} {r['prefill_tokens_per_s']:14.1f} {r['decode_tokens_per_s']:13.1f}")
    if len(rows) == 2:
        a, b = rows.values()
        same = a["tokens"] == b["tokens"]
        speedup = a["decode_tokens_per_s"] / b["decode_tokens_per_s"]
        print(f"greedy tokens identical: {same}; decode speed-up {speedup:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in rows.items()}
        out["config"] = vars(args) | {"json": str(args.json), "device": str(jax.devices()[0])}
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
