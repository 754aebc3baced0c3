"""Helpers that build tiny random Hugging Face Llama models (torch) as the oracle for dsla-jax's Flax model."""

from __future__ import annotations

import numpy as np


def tiny_hf_llama(
    *,
    kv_heads: int = 2,
    tied: bool = True,
    rope_scaling: dict | None = None,
    layers: int = 2,
    seed: int = 0,
):
    """A random transformers LlamaForCausalLM (float32, eval mode): hidden 64, 4 heads, vocab 128."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rope_scaling=rope_scaling,
        tie_word_embeddings=tied,
        rms_norm_eps=1e-5,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms start at 1: perturb them so a wrong norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
