"""Jitted generation against transformers' `generate`, batching, stop tokens and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_reference import hf_state_dict, tiny_hf_llama

from dsla_jax.config import LlamaConfig
from dsla_jax.generate import Generator, SamplingParams, bucket_length
from dsla_jax.models.weights import load_llama


@pytest.fixture(scope="module")
def tiny():
    hf = tiny_hf_llama(kv_heads=2, tied=False, seed=5)
    config = LlamaConfig.from_hf_dict(hf.config.to_dict()).replace(max_position_embeddings=128)
    return hf, load_llama(config, hf_state_dict(hf))


def _hf_greedy(hf, prompt, n):
    ids = torch.tensor([prompt])
    out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt) :].tolist()


def test_greedy_matches_hf_for_a_batch_of_different_lengths(tiny):
    hf, model = tiny
    rs = np.random.RandomState(0)
    prompts = [rs.randint(1, 128, n).tolist() for n in (3, 17, 40)]
    res = Generator(model).generate(prompts, SamplingParams(max_new_tokens=32, greedy=True))
    assert res.bucket == 64 and res.decode_steps == 32
    for p, got in zip(prompts, res.tokens):
        assert got == _hf_greedy(hf, p, 32)


def test_stop_token_ends_a_row(tiny):
    hf, model = tiny
    prompt = np.random.RandomState(1).randint(1, 128, 9).tolist()
    free = Generator(model).generate([prompt], SamplingParams(max_new_tokens=12, greedy=True)).tokens[0]
    stop = free[4]
    first = free.index(stop)
    res = Generator(model, eos_ids=(stop,)).generate([prompt], SamplingParams(max_new_tokens=12, greedy=True))
    assert res.tokens[0] == free[:first] and res.finished == [True]
    assert res.decode_steps == first + 1  # the loop ends as soon as every row is done


def test_sampling_is_seeded_and_respects_top_p(tiny):
    _, model = tiny
    gen = Generator(model)
    prompt = [[5, 6, 7]]
    a = gen.generate(prompt, SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=1)).tokens
    b = gen.generate(prompt, SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=1)).tokens
    c = gen.generate(prompt, SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=2)).tokens
    assert a == b and a != c
    tiny_p = gen.generate(prompt, SamplingParams(max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=3)).tokens
    greedy = gen.generate(prompt, SamplingParams(max_new_tokens=16, greedy=True)).tokens
    assert tiny_p == greedy  # a nucleus of one token is argmax


def test_prompt_past_the_context_limit_is_refused(tiny):
    _, model = tiny
    with pytest.raises(ValueError, match="exceeds the model's context of 128 tokens"):
        Generator(model).generate([[1] * 100], SamplingParams(max_new_tokens=40, greedy=True))
    with pytest.raises(ValueError, match="at least one token"):
        Generator(model).generate([[]], SamplingParams(max_new_tokens=4, greedy=True))


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=0.0), dict(top_p=1.5)])
def test_bad_sampling_params(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_buckets():
    assert [bucket_length(n) for n in (1, 16, 17, 100, 513)] == [16, 16, 32, 128, 1024]
