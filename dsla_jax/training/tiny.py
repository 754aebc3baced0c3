"""A tiny random Llama with a character tokenizer, written as a Hugging Face directory.

For tests and smoke runs of the training pipeline without downloads:

    tiny_model_dir("runs/tiny-model")   # config.json + model.safetensors + tokenizer.json, ~0.2 MB
    python -m train.distill --config configs/smollm2_demo.yaml model.spec=runs/tiny-model ...
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
from flax import nnx
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from dsla_jax.checkpoints import save_hf
from dsla_jax.config import LlamaConfig
from dsla_jax.models.llama import Llama
from dsla_jax.models.weights import llama_state_dict
from dsla_jax.tokenizer import Tokenizer

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")


def char_tokenizer() -> Tokenizer:
    """Printable ASCII characters as tokens (ids 4..), <unk>=0, <s>=1, </s>=2, <pad>=3: 104 ids."""
    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {t: i for i, t in enumerate([*SPECIALS, *chars])}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIALS))
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", add_bos=False)


def tiny_config(layers: int = 4, *, kv_heads: int = 2, tied: bool = True) -> LlamaConfig:
    """hidden 64, 4 heads (head_dim 16), MLP 112, vocab 128."""
    return LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_model_dir(path: str | Path, config: LlamaConfig | None = None, *, seed: int = 0) -> Path:
    """Write a random Llama (`tiny_config()` by default; norms perturbed) + the character tokenizer to `path`."""
    config = config or tiny_config()
    model = Llama(config, rngs=nnx.Rngs(seed))
    state = llama_state_dict(model)
    rng = np.random.default_rng(seed)
    for k in state:
        if k.endswith("norm.weight"):
            state[k] = (1.0 + 0.1 * rng.standard_normal(state[k].shape)).astype(np.float32)
    return save_hf(path, config, state, tokenizer_dir_files=char_tokenizer().to_files(), overwrite=True)


_WORDS = (
    "the a of and to in is was that he for it with as his on be at by had not are but from or have an they which one "
    "you were her all she there would their we him been has when who will more no if out so said what up its about "
    "into than them can only other new some could time these two may then do first any my now such like our over man"
).split()


def tiny_corpus(path: str | Path, *, docs: int = 12, words: int = 400, seed: int = 0) -> Path:
    """A folder of `docs` text files of pseudo-English (seeded, ASCII): training text for the tiny model."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for d in range(docs):
        picks = rng.choice(len(_WORDS), size=words, p=_zipf(len(_WORDS)))
        sentences = " ".join(_WORDS[i] for i in picks).split(" the ")
        text = ". The ".join(sentences).strip() + ".\n"
        (path / f"doc{d:03d}.txt").write_text(text[:1].upper() + text[1:])
    return path


def _zipf(n: int) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1)
    return w / w.sum()
