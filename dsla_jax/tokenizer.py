"""Text <-> token ids and chat prompts, from a Hugging Face directory or from the vocabulary inside a GGUF file.

`Tokenizer` wraps a `tokenizers.Tokenizer` with the few facts generation needs (BOS/EOS/pad ids, whether to prepend
BOS, the Jinja chat template). From GGUF it rebuilds the byte-level BPE that llama.cpp runs; for SmolLM2
(`pre=smollm`) that is digits split one by one, then GPT-2 byte-level pre-tokenization. Transformers' own GGUF tokenizer
drops the digit split, so text like "\\n  2" tokenizes differently there than in llama.cpp; this one matches llama.cpp.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from dsla_jax.checkpoints.errors import CheckpointError
from dsla_jax.checkpoints.gguf import gguf_value, open_gguf
from dsla_jax.checkpoints.resolve import resolve_model_path

# Tokens that end an assistant turn in common chat templates; those the template uses count as EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")
# llama.cpp token types (gguf.TokenType): 2 unknown, 3 control, 4 user-defined.
_SPECIAL_TYPES, _USER_DEFINED_TYPE = (2, 3), 4


class Tokenizer:
    """A `tokenizers.Tokenizer` plus special-token ids and the chat template.

    Args:
        backend: the fast tokenizer; its own post-processor is never applied by `encode`.
        bos_token / eos_token / pad_token / unk_token: token strings (or None).
        add_bos: whether `encode` prepends BOS by default.
        chat_template: Jinja source of the chat template, or None.
        extra_eos_ids: further ids that end generation (e.g. from generation_config.json).
    """

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        extra_eos_ids: Sequence[int] = (),
    ) -> None:
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.add_bos = add_bos
        self.chat_template = chat_template
        self._extra_eos_ids = tuple(int(i) for i in extra_eos_ids)
        for tok in (bos_token, eos_token, pad_token, unk_token):
            if tok is not None and backend.token_to_id(tok) is None:
                raise CheckpointError(f"special token {tok!r} is not in the vocabulary")

    # ------------------------------------------------------------------------------------------------ ids
    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def pad_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """EOS, any extra EOS ids, and the end-of-turn tokens the chat template uses (deduplicated, in that order)."""
        ids = [self._id(self.eos_token), *self._extra_eos_ids]
        template = self.chat_template or ""
        ids += [self._id(t) for t in END_OF_TURN_TOKENS if t in template]
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------------------------------------ text
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) become their ids.

        BOS is prepended when `add_bos` (default: the checkpoint's setting) is true.
        """
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return self._with_bos(ids, add_bos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None) -> list[list[int]]:
        """`encode` for many texts at once (tokenized in parallel)."""
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [self._with_bos(e.ids, add_bos) for e in encodings]

    def _with_bos(self, ids: list[int], add_bos: bool | None) -> list[int]:
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            return [self.bos_id, *ids]
        return list(ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (BOS, `<|im_end|>`, ...) are dropped when `skip_special_tokens`."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @cached_property
    def _compiled_template(self) -> Any:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(f"chat template: {message}")

        def tojson(x: Any, indent: int | None = None) -> str:
            return json.dumps(x, ensure_ascii=False, indent=indent)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kw: Any) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the checkpoint's Jinja chat template.

        The result contains the special tokens as text; `encode` maps them to ids. Extra keywords reach the template.
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        return self._compiled_template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kw,
        )

    # ------------------------------------------------------------------------------------------------ files
    def to_files(self) -> dict[str, str]:
        """`tokenizer.json` and `tokenizer_config.json` contents that transformers' AutoTokenizer loads."""
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        return {"tokenizer.json": self.backend.to_str(), "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `tokenizer.json` + `tokenizer_config.json` into `directory` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in self.to_files().items():
            (directory / name).write_text(text)
        return directory


# ---------------------------------------------------------------------------------------------------- HF directory


def _token_str(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e


def _chat_template(directory: Path, tok_config: dict[str, Any]) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


def _tokenizer_from_dir(directory: Path) -> Tokenizer:
    file = directory / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"{directory}: no tokenizer.json (only fast tokenizers are supported)")
    try:
        backend = HFTokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise CheckpointError(f"{file}: cannot load tokenizer: {e}") from e
    tok_config = _read_json(directory / "tokenizer_config.json")
    model_config = _read_json(directory / "config.json")
    gen_config = _read_json(directory / "generation_config.json")

    def special(name: str) -> str | None:
        token = _token_str(tok_config.get(name))
        if token is None and isinstance(model_config.get(f"{name}_id"), int):
            token = backend.id_to_token(model_config[f"{name}_id"])
        return token

    bos = special("bos_token")
    add_bos = tok_config.get("add_bos_token")
    if add_bos is None:  # no flag: does the tokenizer's own post-processor prepend BOS?
        bos_id = None if bos is None else backend.token_to_id(bos)
        with_special = backend.encode("a", add_special_tokens=True).ids[:1]
        without = backend.encode("a", add_special_tokens=False).ids[:1]
        add_bos = bos_id is not None and with_special == [bos_id] != without
    extra = gen_config.get("eos_token_id", model_config.get("eos_token_id")) or []
    return Tokenizer(
        backend,
        bos_token=bos,
        eos_token=special("eos_token"),
        pad_token=special("pad_token"),
        unk_token=special("unk_token"),
        add_bos=bool(add_bos),
        chat_template=_chat_template(directory, tok_config),
        extra_eos_ids=[extra] if isinstance(extra, int) else list(extra),
    )


# ---------------------------------------------------------------------------------------------------- GGUF


def _gguf_pre_tokenizer(pre: str, add_prefix_space: bool, path: Path) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("gpt-2", "gpt2"):
        return byte_level
    raise CheckpointError(
        f"{path}: GGUF tokenizer pre-tokenizer {pre!r} is not supported (known: smollm, gpt-2); "
        "load the tokenizer from a Hugging Face directory instead"
    )


def _tokenizer_from_gguf(path: Path) -> Tokenizer:
    reader = open_gguf(path)
    kind = gguf_value(reader, "tokenizer.ggml.model", None)
    if kind != "gpt2":
        raise CheckpointError(f"{path}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens: list[str] = gguf_value(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ")) for m in gguf_value(reader, "tokenizer.ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise CheckpointError(f"{path}: malformed tokenizer.ggml.merges (each must be two tokens and one space)")
    types: list[int] = gguf_value(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise CheckpointError(f"{path}: tokenizer.ggml.tokens has duplicate entries")

    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = gguf_value(reader, "tokenizer.ggml.pre", "gpt-2")
    add_prefix_space = bool(gguf_value(reader, "tokenizer.ggml.add_space_prefix", False))
    backend.pre_tokenizer = _gguf_pre_tokenizer(pre, add_prefix_space, path)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t in _SPECIAL_TYPES]
    )
    backend.add_tokens(
        [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == _USER_DEFINED_TYPE]
    )

    def token(key: str) -> str | None:
        i = gguf_value(reader, f"tokenizer.ggml.{key}_token_id", None)
        return None if i is None or not 0 <= int(i) < len(tokens) else tokens[int(i)]

    bos = token("bos")
    add_bos = bool(gguf_value(reader, "tokenizer.ggml.add_bos_token", False)) and bos is not None
    # So that `tokenizer.json` alone (and AutoTokenizer over it) adds BOS exactly when we do.
    if add_bos:
        bos_id = vocab[bos]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return Tokenizer(
        backend,
        bos_token=bos,
        eos_token=token("eos"),
        pad_token=token("padding"),
        unk_token=token("unknown"),
        add_bos=add_bos,
        chat_template=gguf_value(reader, "tokenizer.chat_template", None),
    )


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a model spec: an alias (`smollm2-135m`), a HF directory, or a .gguf file.

    A directory needs `tokenizer.json` (+ optional `tokenizer_config.json`), not necessarily `config.json`.
    """
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return _tokenizer_from_dir(path)
    path = resolve_model_path(spec)
    return _tokenizer_from_dir(path) if path.is_dir() else _tokenizer_from_gguf(path)
