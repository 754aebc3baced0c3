"""Helpers for the checkpoint and tokenizer tests: tiny random transformers Llamas and their saved directories."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_llama(tied: bool, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A random GQA Llama (D=64, 2 layers, 4 heads, 2 KV heads, V=128); norms random too, so a swap shows."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**TINY, tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "norm" in name else 0.1) + (1.0 if "norm" in name else 0.0))
    return model


def save_tiny(model: transformers.PreTrainedModel, directory: Path, **kw) -> Path:
    """`save_pretrained` with safetensors (kw: max_shard_size, ...)."""
    model.save_pretrained(directory, safe_serialization=True, **kw)
    return directory


def torch_state_dict(model: transformers.PreTrainedModel) -> dict[str, np.ndarray]:
    """float32 numpy copy of the model's parameters, lm_head dropped when tied."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def logits(model: transformers.PreTrainedModel, ids: np.ndarray) -> np.ndarray:
    """[B, T, V] float32 logits for int ids [B, T]."""
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


def write_tiny_gguf_tokenizer(path: Path, *, add_bos: bool, pre: str = "smollm", model: str = "gpt2") -> Path:
    """A GGUF holding only a byte-level BPE vocabulary: 3 control tokens, the 256 byte symbols, a few merges."""
    import gguf
    from tokenizers import pre_tokenizers

    specials = ["<s>", "</s>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o"]
    tokens = specials + alphabet + [m.replace(" ", "") for m in merges]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
