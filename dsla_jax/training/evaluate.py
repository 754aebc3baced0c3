"""Held-out perplexity of the teacher and of hybrids (`dsla_jax.metrics.perplexity`), and the summary table."""

from __future__ import annotations

from typing import Any

import numpy as np

from dsla_jax.metrics import perplexity
from dsla_jax.models.llama import Llama
from dsla_jax.tokenizer import Tokenizer
from dsla_jax.training.config import DistillConfig
from dsla_jax.training.data import TokenRows, tokenize_documents


def eval_sets(cfg: DistillConfig, tokenizer: Tokenizer, heldout: TokenRows) -> dict[str, np.ndarray]:
    """{name: token ids}: each `eval.sources` entry (documents joined, EOS between), or the held-out rows."""
    out: dict[str, np.ndarray] = {}
    for source in cfg.eval.sources:
        docs = tokenize_documents(
            tokenizer,
            [source],
            text_field=cfg.data.text_field,
            hf_split=cfg.data.hf_split,
            max_tokens=cfg.eval.max_tokens,
        )
        if docs:
            out[source] = np.concatenate(docs)
    if not cfg.eval.sources and len(heldout):
        out["heldout"] = heldout.tokens[heldout.valid][: cfg.eval.max_tokens]
    return out


def evaluate(model: Llama, sets: dict[str, np.ndarray], cfg: DistillConfig) -> dict[str, dict[str, float]]:
    """{set name: {"ppl", "nll", "tokens"}} over non-overlapping windows of `eval.window` tokens."""
    out = {}
    for name, ids in sets.items():
        r = perplexity(model, ids, window=cfg.eval.window, batch_size=cfg.eval.batch_size, progress=False)
        out[name] = {"ppl": r["ppl"], "nll": r["nll"], "tokens": r["tokens"]}
    return out


def summary_table(records: list[dict[str, Any]]) -> str:
    """Rows = eval sets, columns = evaluated models (teacher, fresh hybrid, trained hybrids), cells = perplexity."""
    if not records:
        return "(no evaluation: no eval.sources and no held-out rows)"
    names = [r["name"] for r in records]
    sets = list(records[0]["results"])
    width = max(12, *(len(n) for n in names))
    first = max(10, *(len(s) for s in sets))
    lines = [f"{'perplexity':<{first}}  " + "  ".join(f"{n:>{width}}" for n in names)]
    for s in sets:
        cells = []
        for r in records:
            v = r["results"].get(s, {}).get("ppl")
            cells.append(f"{v:>{width}.3f}" if v is not None else f"{'-':>{width}}")
        lines.append(f"{s:<{first}}  " + "  ".join(cells))
    teacher = next((r for r in records if r["name"] == "teacher"), None)
    if teacher is not None:
        ratios = []
        for r in records:
            if r is teacher:
                continue
            vals = [r["results"][s]["ppl"] / teacher["results"][s]["ppl"] for s in sets if s in r["results"]]
            ratios.append(f"{r['name']}: x{np.mean(vals):.3f}")
        if ratios:
            lines.append("mean ratio to the teacher: " + ", ".join(ratios))
    return "\n".join(lines)
