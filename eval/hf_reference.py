"""Hugging Face transformers (torch) as the reference side of evaluations. Needs the dev requirements (torch)."""

from __future__ import annotations

import numpy as np
from tqdm import tqdm


def load_hf_model(spec: str):
    """transformers' own loading of the same checkpoint (float32, eval mode): GGUF through `gguf_file`."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover
        raise ValueError("the transformers reference needs torch: pip install -r requirements-dev.txt") from e
    from dsla_jax.checkpoints import resolve_model_path

    path = resolve_model_path(spec)
    if path.is_file():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype="float32"
        )
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype="float32")
    return model.eval()


def hf_perplexity(model, ids, *, window: int = 512, progress: bool = True) -> dict:
    """Perplexity with the same windows as `dsla_jax.metrics.perplexity` (non-overlapping, no carried context)."""
    import torch

    total, count = 0.0, 0
    starts = range(0, len(ids), window)
    with torch.no_grad():
        for s in tqdm(starts, desc="transformers", unit="window", disable=not progress):
            x = torch.tensor([list(ids[s : s + window])])
            if x.shape[1] < 2:
                continue
            logits = model(x).logits[0, :-1].double()
            total += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += x.shape[1] - 1
    return {"ppl": float(np.exp(total / count)), "nll": total / count, "tokens": count}
