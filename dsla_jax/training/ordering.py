"""Which layers to convert first: two per-layer scores, lowest converted first, cached as JSON.

* `entropy` (the original DSLA-Serve heuristic, averaged over many prompts instead of one): the entropy of the last
  query's softmax attention distribution, averaged over heads and prompts. A low entropy means a layer attends
  sharply, which the original takes as the layer the model depends on least for long-range mixing.
* `sensitivity` (measured): KL(teacher || hybrid) of the next-token distributions on held-out text when that one
  layer alone is replaced by its freshly converted DSLA layer (output scale calibrated, as the chain starts it),
  averaged over valid tokens.

Both run the teacher layer by layer (`layerwise.py`). `compare_orders` reports how two orders differ.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from dsla_jax.layers.context import MixerInputs
from dsla_jax.models.hybrid import build_dsla
from dsla_jax.models.llama import Llama
from dsla_jax.training.calibrate import calibrate
from dsla_jax.training.chain import configure_dsla
from dsla_jax.training.config import ModelSection, OrderingSection
from dsla_jax.training.data import TokenRows
from dsla_jax.training.forward import mixer_inputs, original_attention
from dsla_jax.training.layerwise import apply_layer, embed, kl_sum, layer_inputs, log_probs, row_batches, split_layers

METHODS = ("entropy", "sensitivity")


# ---- scores ------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _last_query_entropy(layer_graph, layer_state, x, info: MixerInputs) -> jax.Array:
    """Attention entropy of each row's last valid query, mean over heads: x [B, T, D] -> [B] float32 (nats)."""
    layer = nnx.merge(layer_graph, layer_state)
    attn = original_attention(layer)
    q, k, _ = attn.project_qkv(layer.input_layernorm(x), info)  # q [B, T, H, hd], k [B, T, Hk, hd]
    b, t, h, hd = q.shape
    hk = k.shape[2]
    last = jnp.sum(info.valid, axis=1) - 1  # [B]
    q_last = q[jnp.arange(b), last].reshape(b, hk, h // hk, hd)
    scores = jnp.einsum("bkgd,bskd->bkgs", q_last, k, preferred_element_type=jnp.float32) * hd**-0.5
    allowed = (info.valid & (jnp.arange(t)[None, :] <= last[:, None]))[:, None, None, :]
    logp = jax.nn.log_softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1)
    ent = -jnp.sum(jnp.where(allowed, jnp.exp(logp) * logp, 0.0), axis=-1)  # [B, Hk, G]
    return ent.reshape(b, -1).mean(axis=1)


def entropy_scores(model: Llama, rows: TokenRows, cfg: OrderingSection, *, seed: int = 0, progress: bool = True):
    """Per-layer mean last-query attention entropy over `cfg.prompts` prompts cut from `rows`.

    Prompt j is row j (of the first `cfg.prompts` rows) truncated to a length drawn uniformly from
    [prompt_len / 2, prompt_len] (so the last query sits at many positions). Returns a list of L floats.
    """
    if len(rows) == 0:
        raise ValueError("no text rows to draw ordering prompts from")
    n = min(cfg.prompts, len(rows))
    t = min(cfg.prompt_len, rows.seq_len)
    lengths = np.random.default_rng(seed).integers(max(2, t // 2), t + 1, size=n)
    tokens = rows.tokens[:n, :t]
    valid = rows.valid[:n, :t] & (np.arange(t)[None, :] < lengths[:, None])
    graph, state = nnx.split(model)
    layers = split_layers(model)
    totals = np.zeros(len(layers))
    for start in tqdm(range(0, n, cfg.batch_size), desc="entropy", unit="batch", disable=not progress):
        tok = jnp.asarray(tokens[start : start + cfg.batch_size])
        val = jnp.asarray(valid[start : start + cfg.batch_size])
        info = mixer_inputs(model, val)
        x = embed(graph, state, tok)
        for i, (lg, ls) in enumerate(layers):
            totals[i] += float(jnp.sum(_last_query_entropy(lg, ls, x, info)))
            x = apply_layer(lg, ls, None, None, x, info)
    return (totals / n).tolist()


def sensitivity_scores(
    model: Llama,
    rows: TokenRows,
    cfg: OrderingSection,
    model_cfg: ModelSection,
    *,
    calibration_rows: TokenRows | None = None,
    num_calibration_rows: int = 8,
    progress: bool = True,
) -> list[float]:
    """Per-layer KL(teacher || model with that layer alone freshly converted to DSLA) on held-out `rows`.

    With `calibration_rows`, each fresh layer's output scale is calibrated first (as the chain does).
    """
    if len(rows) == 0:
        raise ValueError("no held-out rows to measure layer sensitivity on")
    graph, state = nnx.split(model)
    layers = split_layers(model)
    fresh = {}
    for i in range(len(layers)):
        fresh[i] = build_dsla(model, i)
        configure_dsla(fresh[i], model_cfg)
    if calibration_rows is not None:
        calibrate(model, fresh, calibration_rows, num_rows=num_calibration_rows, batch_size=cfg.batch_size)
    mixers = {i: nnx.split(m) for i, m in fresh.items()}
    max_rows = max(1, -(-cfg.sensitivity_tokens // rows.seq_len))
    totals, count = np.zeros(len(layers)), 0
    batches = list(row_batches(rows, cfg.batch_size, max_rows))
    for tok, val in tqdm(batches, desc="sensitivity", unit="batch", disable=not progress):
        info, xs = layer_inputs(model, layers, tok, val)
        teacher_logp = log_probs(graph, state, xs[-1])
        for i, (lg, ls) in enumerate(layers):
            x = apply_layer(lg, ls, mixers[i][0], mixers[i][1], xs[i], info)
            for lg2, ls2 in layers[i + 1 :]:
                x = apply_layer(lg2, ls2, None, None, x, info)
            totals[i] += float(kl_sum(graph, state, x, teacher_logp, val))
        count += int(jnp.sum(val))
    return (totals / max(count, 1)).tolist()


def order_from_scores(scores: list[float]) -> list[int]:
    """Layers sorted by score, lowest first (ties: lower index first)."""
    return [int(i) for i in np.argsort(np.asarray(scores), kind="stable")]


# ---- cache and comparison ----------------------------------------------------------------------------------------


def cached_order(
    method: str,
    cache_file: Path,
    key: dict[str, Any],
    compute,
) -> dict[str, Any]:
    """{"method", "scores", "order", "key"}: read from `cache_file` when its key matches, else computed and written."""
    if method not in METHODS:
        raise ValueError(f"ordering method {method!r} is not one of {', '.join(METHODS)}")
    cache_file = Path(cache_file)
    if cache_file.is_file():
        cached = json.loads(cache_file.read_text())
        if cached.get("method") == method and cached.get("key") == key:
            return cached
    scores = compute()
    result = {"method": method, "scores": scores, "order": order_from_scores(scores), "key": key}
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _ranks(order: list[int]) -> np.ndarray:
    r = np.empty(len(order))
    r[np.asarray(order)] = np.arange(len(order))
    return r


def compare_orders(a: list[int], b: list[int], counts: tuple[int, ...] = ()) -> dict[str, Any]:
    """How two full orders of the same layers differ: Spearman rho, Kendall tau, overlap of their first n layers."""
    if sorted(a) != sorted(b):
        raise ValueError("the two orders must rank the same layers")
    ra, rb = _ranks(a), _ranks(b)
    n = len(a)
    rho = 1.0 - 6.0 * float(np.sum((ra - rb) ** 2)) / (n * (n * n - 1)) if n > 1 else 1.0
    concordant = sum(np.sign(ra[i] - ra[j]) == np.sign(rb[i] - rb[j]) for i in range(n) for j in range(i + 1, n))
    pairs = n * (n - 1) // 2
    tau = (2.0 * concordant - pairs) / pairs if pairs else 1.0
    overlap = {int(c): len(set(a[:c]) & set(b[:c])) for c in counts}
    return {"spearman": rho, "kendall_tau": tau, "overlap_first_n": overlap}


def format_comparison(results: dict[str, dict[str, Any]], comparison: dict[str, Any] | None = None) -> str:
    """A text table: rank, then each method's layer and score at that rank; comparison figures below."""
    methods = list(results)
    head = "rank  " + "  ".join(f"{m:>12} layer (score)" for m in methods)
    lines = [head]
    for r in range(len(next(iter(results.values()))["order"])):
        cells = []
        for m in methods:
            layer = results[m]["order"][r]
            cells.append(f"{layer:>18d} ({results[m]['scores'][layer]:.4g})")
        lines.append(f"{r:>4}  " + "  ".join(cells))
    if comparison:
        lines.append(f"Spearman rho {comparison['spearman']:.3f}, Kendall tau {comparison['kendall_tau']:.3f}")
        for c, k in comparison["overlap_first_n"].items():
            lines.append(f"first {c} layers: {k} in common")
    return "\n".join(lines)


def layer_order(
    method: str,
    model: Llama,
    *,
    prompt_rows: TokenRows,
    heldout_rows: TokenRows,
    cfg: OrderingSection,
    model_cfg: ModelSection,
    fingerprint: str,
    cache_dir: str | Path,
    calibration_rows: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """The scores and order of `method`, cached as `<cache_dir>/ordering_<method>[_<mixer>].json` (reused when model,
    data and settings match). Entropy prompts come from `prompt_rows`, sensitivity text from `heldout_rows`; with
    `calibration_rows` > 0 the fresh layers' output scales are calibrated on that many `prompt_rows` first."""
    if method == "entropy":
        key = {
            "model": fingerprint,
            "data": prompt_rows.fingerprint(),
            "prompts": cfg.prompts,
            "prompt_len": cfg.prompt_len,
        }
        compute = lambda: entropy_scores(model, prompt_rows, cfg, progress=progress)  # noqa: E731
    else:
        key = {
            "model": fingerprint,
            "data": heldout_rows.fingerprint(),
            "tokens": cfg.sensitivity_tokens,
            "mixer": model_cfg.mixer,
            "grouped": model_cfg.dsla_grouped,
            "calibration_rows": calibration_rows,
        }
        compute = lambda: sensitivity_scores(  # noqa: E731
            model,
            heldout_rows,
            cfg,
            model_cfg,
            calibration_rows=prompt_rows if calibration_rows else None,
            num_calibration_rows=calibration_rows,
            progress=progress,
        )
    # The sensitivity of a GLA-ablation run is measured with GLA layers: its own file, so runs of both mixers that
    # share a cache folder do not overwrite each other's order.
    name = method if method == "entropy" or model_cfg.mixer == "dsla" else f"{method}_{model_cfg.mixer}"
    return cached_order(method, Path(cache_dir) / f"ordering_{name}.json", key, compute)
