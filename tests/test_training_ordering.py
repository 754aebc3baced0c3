"""Conversion order: the entropy and sensitivity scores on a tiny model, the JSON cache, comparing two orders; the
chain plan; output-scale calibration of fresh DSLA layers."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsla_jax.models.hybrid import build_dsla
from dsla_jax.models.llama import Llama
from dsla_jax.training.calibrate import calibrate, output_scales
from dsla_jax.training.chain import make_plan, stage_counts
from dsla_jax.training.config import ChainSection, DistillConfigError, ModelSection, OrderingSection
from dsla_jax.training.data import build_rows
from dsla_jax.training.forward import mixer_inputs
from dsla_jax.training.ordering import (
    compare_orders,
    entropy_scores,
    format_comparison,
    layer_order,
    order_from_scores,
)
from dsla_jax.training.tiny import tiny_config

MODEL_CFG = ModelSection(dsla_impl="xla", dsla_chunk_size=16)
ORD_CFG = OrderingSection(prompts=6, prompt_len=24, sensitivity_tokens=64, batch_size=4)


@pytest.fixture(scope="module")
def model():
    return Llama(tiny_config(layers=3), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def rows():
    rs = np.random.RandomState(0)
    return build_rows([rs.randint(3, 128, 400).astype(np.int32)], seq_len=32)


def _last_query_entropy_direct(model: Llama, tokens: np.ndarray, length: int, layer: int) -> float:
    """Entropy of the last query's attention in `layer`, from the full softmax (a direct recomputation)."""
    t = jnp.asarray(tokens[None, :length])
    valid = jnp.ones_like(t, bool)
    info = mixer_inputs(model, valid)
    x = model.embed_tokens(t)
    for i, lyr in enumerate(model.layers):
        h = lyr.input_layernorm(x)
        if i == layer:
            q, k, _ = lyr.self_attn.project_qkv(h, info)
            g = q.shape[2] // k.shape[2]
            k = jnp.repeat(k, g, axis=2)
            s = jnp.einsum("hd,shd->hs", q[0, -1], k[0]) / np.sqrt(q.shape[-1])
            p = np.asarray(jnp.exp(s - jnp.max(s, -1, keepdims=True)), np.float64)
            p /= p.sum(-1, keepdims=True)
            return float(np.mean(-(p * np.log(p)).sum(-1)))
        x = x + lyr.self_attn(h, info)[0]
        x = x + lyr.mlp(lyr.post_attention_layernorm(x))
    raise AssertionError


def test_entropy_scores_match_a_direct_computation(model, rows):
    cfg = OrderingSection(prompts=3, prompt_len=32, batch_size=2)
    scores = entropy_scores(model, rows, cfg, seed=0, progress=False)
    lengths = np.random.default_rng(0).integers(16, 33, size=3)
    for layer in range(3):
        direct = np.mean([_last_query_entropy_direct(model, rows.tokens[j], lengths[j], layer) for j in range(3)])
        assert scores[layer] == pytest.approx(direct, rel=1e-4)


def test_layer_order_is_cached(model, rows, tmp_path):
    kw = dict(prompt_rows=rows, heldout_rows=rows, cfg=ORD_CFG, model_cfg=MODEL_CFG, fingerprint="m", progress=False)
    first = layer_order("sensitivity", model, cache_dir=tmp_path, calibration_rows=2, **kw)
    assert sorted(first["order"]) == [0, 1, 2] and all(s > 0 for s in first["scores"])
    assert first["order"] == order_from_scores(first["scores"])
    cached = tmp_path / "ordering_sensitivity.json"
    assert cached.is_file()
    again = layer_order("sensitivity", model, cache_dir=tmp_path, calibration_rows=2, **kw)
    assert again == first
    other = layer_order("entropy", model, cache_dir=tmp_path, **kw)
    assert (tmp_path / "ordering_entropy.json").is_file() and sorted(other["order"]) == [0, 1, 2]


def test_compare_orders():
    same = compare_orders([2, 0, 1], [2, 0, 1], (1, 2))
    assert same["spearman"] == pytest.approx(1.0) and same["kendall_tau"] == pytest.approx(1.0)
    rev = compare_orders([0, 1, 2, 3], [3, 2, 1, 0], (2,))
    assert rev["spearman"] == pytest.approx(-1.0) and rev["overlap_first_n"] == {2: 0}
    table = format_comparison(
        {"entropy": {"order": [1, 0], "scores": [2.0, 1.0]}, "sensitivity": {"order": [0, 1], "scores": [0.1, 0.2]}},
        compare_orders([1, 0], [0, 1], (1,)),
    )
    assert "Spearman rho -1.000" in table and "first 1 layers: 0 in common" in table
    with pytest.raises(ValueError, match="same layers"):
        compare_orders([0, 1], [0, 2])


def test_stage_counts_and_plan():
    assert stage_counts((0.25, 0.5, 0.75), 30) == (8, 15, 23)
    assert stage_counts((1, 3), 4) == (1, 3)
    with pytest.raises(DistillConfigError, match="1.5 is neither a fraction"):
        stage_counts((1.5,), 4)
    plan = make_plan(ChainSection(stages=(0.5,)), 4, [3, 1, 0, 2])
    assert plan.chain_layers == (3, 1)
    np.testing.assert_array_equal(plan.active_mask(1), [False, True, False, True])
    np.testing.assert_array_equal(plan.train_mask(1, train_previous=False), [False, True, False, False])
    with pytest.raises(DistillConfigError, match="names layer 7, but the model has 4 layers"):
        make_plan(ChainSection(stages=(0.5,)), 4, [7, 1])
    with pytest.raises(DistillConfigError, match="lists 1 layers, but chain.stages converts up to 2"):
        make_plan(ChainSection(stages=(2,)), 4, [1])


def test_calibration_matches_the_attention_output_scale(model, rows):
    mixers = {i: build_dsla(model, i) for i in (0, 2)}
    for m in mixers.values():
        m.impl = "xla"
    before = output_scales(model, mixers, rows, num_rows=4)
    assert all(s != pytest.approx(1.0, abs=1e-3) for s in before.values())
    applied = calibrate(model, mixers, rows, num_rows=4)
    assert applied == pytest.approx(before)
    after = output_scales(model, mixers, rows, num_rows=4)
    assert after == pytest.approx({0: 1.0, 2: 1.0}, rel=1e-4)
