"""Tokenizer: llama.cpp-exact BPE from GGUF (digits split), decode round trips, chat template, save -> AutoTokenizer."""

from __future__ import annotations

import json
import re

import pytest
import transformers
from _ckpt_fixtures import write_tiny_gguf_tokenizer

from dsla_jax.checkpoints import CheckpointError
from dsla_jax.tokenizer import load_tokenizer

CHAT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "Thanks!"},
]


@pytest.fixture(scope="module")
def tok(smollm2_path):
    return load_tokenizer(str(smollm2_path))


@pytest.fixture(scope="module")
def hf_gguf_tok(smollm2_path):
    """transformers' own GGUF -> HF tokenizer conversion (the one that drops the digit split)."""
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)


@pytest.fixture(scope="module")
def samples(corpus_valid):
    """~6k characters from each validation document."""
    files = sorted(p for p in corpus_valid.rglob("*") if p.is_file())
    texts = {p.name: p.read_text(encoding="utf-8") for p in files}
    return {name: text[2000:8000] if len(text) > 8000 else text for name, text in texts.items()}


def test_special_ids(tok):
    assert (tok.bos_id, tok.pad_id, tok.vocab_size, tok.add_bos) == (1, 2, 49152, False)
    assert tok.id_to_token(tok.bos_id) == "<|im_start|>"
    assert tok.eos_ids == (2,) and tok.id_to_token(2) == "<|im_end|>"


def test_digits_one_token_each(tok):
    ids = tok.encode("In 2024, 123456")
    pieces = [tok.id_to_token(i) for i in ids]
    assert [p for p in pieces if p.isdigit()] == list("2024123456")
    assert all(len(p) == 1 for p in pieces if any(c.isdigit() for c in p))


def test_decode_round_trip(tok, samples):
    for name, text in samples.items():
        ids = tok.encode(text)
        assert len(ids) < len(text) / 2, name
        assert tok.decode(ids) == text, name
    batch = tok.encode_batch(list(samples.values()))
    assert batch == [tok.encode(t) for t in samples.values()]


def test_matches_transformers_gguf_tokenizer_without_digits(tok, hf_gguf_tok, samples):
    for name, text in samples.items():
        text = re.sub(r"\d", "", text)
        assert tok.encode(text) == hf_gguf_tok(text, add_special_tokens=False).input_ids, name


def test_differs_from_transformers_on_digits_after_spaces(tok, hf_gguf_tok):
    """llama.cpp splits digits before the whitespace rule: '\\n  2' -> 'ĊĠĠ' '2'; transformers gives 'ĊĠ' 'Ġ' '2'."""
    text = "x\n  2"
    ours = [tok.id_to_token(i) for i in tok.encode(text)]
    theirs = hf_gguf_tok.convert_ids_to_tokens(hf_gguf_tok(text, add_special_tokens=False).input_ids)
    assert ours == ["x", "ĊĠĠ", "2"]
    assert theirs == ["x", "ĊĠ", "Ġ", "2"]
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_in_text(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_chat_template(tok, hf_gguf_tok):
    text = tok.apply_chat_template(CHAT)
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n" in text
    assert text.endswith("<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n")
    assert not tok.apply_chat_template(CHAT, add_generation_prompt=False).endswith("assistant\n")
    assert text == hf_gguf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)


def test_save_then_auto_tokenizer(tok, tmp_path):
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Hello <|im_start|>user 2024\n  2 world"
    assert hf(text).input_ids == tok.encode(text)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 2)
    assert hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(CHAT)
    again = load_tokenizer(tmp_path)
    assert again.encode(text) == tok.encode(text)
    assert (again.bos_id, again.eos_ids, again.pad_id, again.add_bos) == (1, (2,), 2, False)


@pytest.mark.parametrize("add_bos", [True, False])
def test_tiny_gguf_tokenizer(tmp_path, add_bos):
    tok = load_tokenizer(write_tiny_gguf_tokenizer(tmp_path / "tiny.gguf", add_bos=add_bos))
    ids = tok.encode("hello world 42")
    pieces = [tok.id_to_token(i) for i in ids]
    assert pieces == ["<s>"] * add_bos + ["hello", "Ġwo", "r", "l", "d", "Ġ", "4", "2"]
    assert tok.encode("hello", add_bos=False) == ids[add_bos : add_bos + 1]
    assert tok.decode(ids) == "hello world 42"
    assert tok.eos_ids == (1, 2)  # </s>, and <|im_end|> because the template uses it
    tok.save(tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf("hello world 42").input_ids == ids
    config_file = tmp_path / "hf" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    del config["add_bos_token"]  # without the flag, add_bos comes from tokenizer.json's post-processor
    config_file.write_text(json.dumps(config))
    assert load_tokenizer(tmp_path / "hf").encode("hello world 42") == ids


def test_transformers_saved_directory(hf_gguf_tok, tmp_path):
    """A directory written by transformers (its tokenizer, without the digit split) loads and encodes as it does."""
    hf_gguf_tok.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    text = "Hi <|im_start|>there 2024\n  2"
    assert tok.encode(text) == hf_gguf_tok(text).input_ids
    assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (1, (2,), 2)
    assert tok.apply_chat_template(CHAT) == hf_gguf_tok.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True
    )


def test_unsupported_gguf_tokenizers(tmp_path):
    with pytest.raises(CheckpointError, match="a.gguf: GGUF tokenizer pre-tokenizer 'llama-bpe' is not supported"):
        load_tokenizer(write_tiny_gguf_tokenizer(tmp_path / "a.gguf", add_bos=True, pre="llama-bpe"))
    with pytest.raises(CheckpointError, match="b.gguf: GGUF tokenizer model 'llama' is not supported"):
        load_tokenizer(write_tiny_gguf_tokenizer(tmp_path / "b.gguf", add_bos=True, model="llama"))


def test_directory_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
