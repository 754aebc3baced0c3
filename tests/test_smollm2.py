"""The real SmolLM2-135M-Instruct checkpoint (Q4_1 GGUF, dequantized to float32) against transformers' own loading."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dsla_jax.generate import Generator, SamplingParams
from dsla_jax.metrics import perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_ids(smollm2, corpus_valid):
    _, tok = smollm2
    ids = tok.encode((corpus_valid / "gnu_standards.txt").read_text(encoding="utf-8"))
    assert len(ids) > 4096
    return ids


def test_logits_match_transformers_on_700_real_tokens(smollm2, smollm2_hf, real_ids):
    model, _ = smollm2
    ids = np.asarray(real_ids[:700])[None]  # > one 512-query attention block
    ours = np.asarray(model.logits(model(jnp.asarray(ids))[0]))[0]
    with torch.no_grad():
        ref = smollm2_hf(torch.tensor(ids)).logits[0].numpy()
    diff = np.abs(ours - ref).max()
    assert diff <= 2e-3, f"max |logit diff| {diff:.3g} > 2e-3"
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_greedy_32_tokens_identical_to_transformers(smollm2, smollm2_hf, real_ids):
    model, tok = smollm2
    prompt = real_ids[1000:1200]
    ours = Generator(model, eos_ids=()).generate([prompt], SamplingParams(max_new_tokens=32, greedy=True)).tokens[0]
    with torch.no_grad():
        ref = smollm2_hf.generate(
            torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=tok.pad_id
        )[0, len(prompt) :].tolist()
    assert ours == ref


def test_perplexity_matches_transformers_on_the_same_ids(smollm2, smollm2_hf, real_ids):
    model, _ = smollm2
    ids = real_ids[:2048]
    ours = perplexity(model, ids, window=512, progress=False)
    from eval.hf_reference import hf_perplexity

    hf = hf_perplexity(smollm2_hf, ids, window=512, progress=False)
    ref = hf["ppl"]
    assert ours["tokens"] == hf["tokens"]
    assert abs(ours["ppl"] / ref - 1) < 5e-3, f"ours {ours['ppl']:.4f} vs transformers {ref:.4f}"


def test_gguf_export_round_trip_through_transformers(smollm2, tmp_path, real_ids):
    import transformers

    from dsla_jax.export import export_hf

    model, tok = smollm2
    out = export_hf(model, tok, tmp_path / "smollm2-hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype="float32").eval()
    ids = np.asarray(real_ids[:256])[None]
    ours = np.asarray(model.logits(model(jnp.asarray(ids))[0]))[0]
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits[0].numpy()
    assert np.abs(ours - ref).max() <= 2e-3
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "Exported 2 tokenizers, 13 ways."
    assert hf_tok(text)["input_ids"] == tok.encode(text)


def test_chat_answers_paris(smollm2):
    model, tok = smollm2
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    gen = Generator(model, eos_ids=tok.eos_ids, pad_id=tok.pad_id)
    res = gen.generate([prompt], SamplingParams(max_new_tokens=24, greedy=True))
    assert "Paris" in tok.decode(res.tokens[0])
    assert res.finished == [True]


def test_first_layer_as_untrained_dsla_still_runs(smollm2_path, real_ids):
    from dsla_jax.loading import load_model
    from dsla_jax.models.hybrid import convert_to_dsla

    model, _ = load_model(smollm2_path)
    convert_to_dsla(model, 0)
    result = perplexity(model, real_ids[:1024], window=512, progress=False)
    assert np.isfinite(result["ppl"]) and result["ppl"] > 1
