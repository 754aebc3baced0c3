"""The Flax Llama against Hugging Face transformers (torch, float32) on tiny random models of every branch."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import hf_logits, hf_state_dict, tiny_hf_llama

from dsla_jax.config import LlamaConfig
from dsla_jax.models.llama import positions_from_valid
from dsla_jax.models.weights import llama_state_dict, load_llama

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
CASES = [
    pytest.param(dict(kv_heads=2, tied=True), id="gqa-tied"),
    pytest.param(dict(kv_heads=4, tied=False), id="mha-untied"),
    pytest.param(dict(kv_heads=1, tied=False), id="mqa-untied"),
    pytest.param(dict(kv_heads=2, tied=True, rope_scaling=LLAMA3), id="gqa-llama3-rope"),
]


def _pair(**kw):
    hf = tiny_hf_llama(**kw)
    config = LlamaConfig.from_hf_dict(hf.config.to_dict())
    return hf, config, hf_state_dict(hf)


@pytest.mark.parametrize("kw", CASES)
def test_logits_match_hf_float32(kw):
    hf, config, sd = _pair(**kw)
    model = load_llama(config, sd)
    tokens = np.random.RandomState(0).randint(0, 128, (2, 200))
    hidden, _ = model(jnp.asarray(tokens))
    ours = np.asarray(model.logits(hidden))
    ref = hf_logits(hf, tokens)
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=0, err_msg="float32 logits differ from transformers")
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("kw", CASES[:2])
def test_bfloat16_close_to_float32(kw):
    hf, config, sd = _pair(**kw)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 128, (1, 64)))
    f32 = load_llama(config, sd)
    bf16 = load_llama(config, sd, dtype=jnp.bfloat16)
    a = np.asarray(f32.logits(f32(tokens)[0]))
    b = np.asarray(bf16.logits(bf16(tokens)[0]))
    assert np.isfinite(b).all()
    rel = np.sqrt(np.mean((a - b) ** 2) / np.mean(a**2))
    assert rel < 3e-2, f"bf16 logits RMS relative error {rel:.3g}"


@pytest.mark.parametrize("kw", CASES)
def test_state_dict_round_trip(kw):
    hf, config, sd = _pair(**kw)
    back = llama_state_dict(load_llama(config, sd))
    expected = {k for k in sd if not (config.tie_word_embeddings and k == "lm_head.weight")}
    assert set(back) == expected
    for k in back:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_cached_prefill_and_decode_equal_full_forward():
    hf, config, sd = _pair(kv_heads=2, tied=True)
    model = load_llama(config, sd)
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, 128, (2, 70)))
    full, _ = model(tokens)
    cache = model.init_cache(2, 96)
    parts = []
    h, cache = model(tokens[:, :61], cache=cache)
    parts.append(h)
    for t in range(61, 70):
        h, cache = model(tokens[:, t : t + 1], positions=jnp.full((2, 1), t), cache=cache)
        parts.append(h)
    np.testing.assert_allclose(np.concatenate(parts, 1), np.asarray(full), atol=1e-5)
    assert int(cache["index"]) == 70


def test_left_padding_equals_unpadded_row():
    hf, config, sd = _pair(kv_heads=2, tied=True)
    model = load_llama(config, sd)
    row = np.random.RandomState(3).randint(1, 128, 20)
    alone, _ = model(jnp.asarray(row[None]))
    padded = np.concatenate([np.zeros(12, int), row])[None]
    valid = jnp.asarray(padded != 0) | jnp.asarray(np.arange(32) >= 12)[None]
    out, _ = model(jnp.asarray(padded), positions=positions_from_valid(valid), valid=valid)
    np.testing.assert_allclose(np.asarray(out[:, 12:]), np.asarray(alone), atol=1e-5)


def test_wrong_shape_names_the_tensor():
    hf, config, sd = _pair(kv_heads=2, tied=True)
    sd = dict(sd)
    sd["model.layers.1.self_attn.k_proj.weight"] = np.zeros((7, 64), np.float32)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*\(7, 64\)"):
        load_llama(config, sd)
    del sd["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match="no tensor 'model.layers.1.self_attn.k_proj.weight'"):
        load_llama(config, sd)


@pytest.mark.parametrize("t", [5, 48, 50])
def test_query_blocked_attention_equals_one_block(t):
    from dsla_jax.layers.attention import grouped_attention

    rs = np.random.RandomState(t)
    q = jnp.asarray(rs.randn(2, t, 4, 8), jnp.float32)
    k, v = (jnp.asarray(rs.randn(2, 64, 2, 8), jnp.float32) for _ in range(2))
    mask = jnp.asarray(rs.rand(2, t, 64) > 0.3)
    whole = grouped_attention(q, k, v, mask, scale=0.3, block_q=4096)
    blocked = grouped_attention(q, k, v, mask, scale=0.3, block_q=16)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(whole), atol=1e-6)
