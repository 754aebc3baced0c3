"""llama.cpp GGUF files: Llama config from metadata, dequantized float32 state dict in Hugging Face layout.

GGUF lists tensor dims fastest-first (`t.shape` is the reverse of the numpy shape). llama.cpp's converter permutes the
rows of q_proj (with H heads) and k_proj (with KV heads) so that each head's rotary pairs are interleaved:
`w.reshape(n, 2, hd // 2, D).swapaxes(1, 2).reshape(n * hd, D)`. `unpermute_qk` inverts that, restoring the Hugging Face
(rotate-half) order.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

from dsla_jax.checkpoints.errors import CheckpointError
from dsla_jax.checkpoints.hf import check_state_dict
from dsla_jax.config import ConfigError, LlamaConfig

GGUF_MAGIC = b"GGUF"
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_MISSING = object()


def open_gguf(path: str | os.PathLike) -> GGUFReader:
    """A memory-mapped GGUFReader; CheckpointError for a file that is not GGUF, truncated or corrupt."""
    path = Path(path)
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader fails with ValueError/IndexError/struct.error on a short or damaged file
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from e


def gguf_value(reader: GGUFReader, key: str, default: Any = _MISSING) -> Any:
    """The metadata value under `key` (str, number, bool or list); `default` when absent, else CheckpointError."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise CheckpointError(f"{reader.data.filename}: GGUF metadata has no {key!r}")
        return default
    return field.contents()


def hf_tensor_name(name: str) -> str | None:
    """Hugging Face name of a llama.cpp tensor: `blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_TENSOR.fullmatch(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return None


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation. w: [n_heads * hd, D] -> [n_heads * hd, D] in Hugging Face order."""
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return w.reshape(n_heads, hd // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def _f32_to_float(x: float) -> float:
    """The shortest decimal that a float32 metadata value stands for (9.999999747e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def config_from_gguf(reader: GGUFReader, path: str | os.PathLike) -> LlamaConfig:
    """LlamaConfig from `llama.*` metadata; CheckpointError for non-Llama or unsupported variants."""
    arch = gguf_value(reader, "general.architecture", None)
    if arch != "llama":
        raise CheckpointError(f"{path}: general.architecture is {arch!r}; only 'llama' GGUF files are supported")
    if int(gguf_value(reader, "llama.expert_count", 0) or 0) > 0:
        raise CheckpointError(f"{path}: mixture-of-experts llama GGUF files are not supported")
    scaling = gguf_value(reader, "llama.rope.scaling.type", "none")
    tensors = {t.name: t for t in reader.tensors}
    if scaling != "none" or "rope_freqs.weight" in tensors:
        raise CheckpointError(f"{path}: GGUF rope scaling ({scaling}, rope_freqs) is not supported; use HF weights")
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: missing tensor token_embd.weight")
    hidden = int(gguf_value(reader, "llama.embedding_length"))
    heads = int(gguf_value(reader, "llama.attention.head_count"))
    head_dim = int(gguf_value(reader, "llama.attention.key_length", hidden // heads))
    if int(gguf_value(reader, "llama.attention.value_length", head_dim)) != head_dim:
        raise CheckpointError(f"{path}: key_length != value_length is not supported")
    if int(gguf_value(reader, "llama.rope.dimension_count", head_dim)) != head_dim:
        raise CheckpointError(f"{path}: partial rotary embeddings (rope.dimension_count != head_dim) are not supported")
    bos = gguf_value(reader, "tokenizer.ggml.bos_token_id", None)
    eos = gguf_value(reader, "tokenizer.ggml.eos_token_id", None)
    try:
        return LlamaConfig(
            vocab_size=int(tensors["token_embd.weight"].shape[-1]),
            hidden_size=hidden,
            intermediate_size=int(gguf_value(reader, "llama.feed_forward_length")),
            num_hidden_layers=int(gguf_value(reader, "llama.block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(gguf_value(reader, "llama.attention.head_count_kv", heads)),
            head_dim=head_dim,
            max_position_embeddings=int(gguf_value(reader, "llama.context_length")),
            rms_norm_eps=_f32_to_float(gguf_value(reader, "llama.attention.layer_norm_rms_epsilon")),
            rope_theta=_f32_to_float(gguf_value(reader, "llama.rope.freq_base", 10000.0)),
            tie_word_embeddings="output.weight" not in tensors,
            bos_token_id=None if bos is None else int(bos),
            eos_token_id=None if eos is None else int(eos),
        )
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e


def load_gguf(path: str | os.PathLike) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """Read a llama GGUF file: config and dequantized float32 state dict (Hugging Face names, layouts and q/k order)."""
    path = Path(path)
    reader = open_gguf(path)
    config = config_from_gguf(reader, path)
    state_dict: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        if name is None:
            raise CheckpointError(f"{path}: unknown tensor {t.name!r} in a llama GGUF file")
        try:
            values = dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot dequantize {t.name} ({t.tensor_type.name}): {e}") from e
        shape = tuple(int(d) for d in reversed(t.shape))
        if values.size != int(np.prod(shape)):
            raise CheckpointError(f"{path}: tensor {t.name} holds {values.size} values, its shape is {shape}")
        state_dict[name] = np.array(values, dtype=np.float32).reshape(shape)
    check_state_dict(config, state_dict, path)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        state_dict[p + "q_proj.weight"] = unpermute_qk(state_dict[p + "q_proj.weight"], config.num_attention_heads)
        state_dict[p + "k_proj.weight"] = unpermute_qk(state_dict[p + "k_proj.weight"], config.num_key_value_heads)
    return config, state_dict
