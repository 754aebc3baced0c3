"""Model configuration: the architecture keys of a Llama-family model.

`LlamaConfig` mirrors the subset of Hugging Face's `LlamaConfig` that dsla-jax implements, plus the DSLA keys
(`dsla_layers`, `dsla_grouped`). It converts to and from HF `config.json` dictionaries.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM")


class ConfigError(ValueError):
    """A configuration that dsla-jax cannot build a model from."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style (`rope_type: llama3`) frequency scaling."""

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int | None = None
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    # DSLA: which decoder layers run dual-state linear attention instead of softmax attention.
    dsla_layers: tuple[int, ...] = field(default_factory=tuple)
    # True: DSLA states per KV head (grouped); False: K/V weights repeated to every query head (the original).
    dsla_grouped: bool = True

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"hidden_size={self.hidden_size} not divisible by heads={self.num_attention_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        bad = [i for i in self.dsla_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ConfigError(f"dsla_layers {bad} out of range for a model with {self.num_hidden_layers} layers")
        object.__setattr__(self, "dsla_layers", tuple(sorted(set(int(i) for i in self.dsla_layers))))

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def replace(self, **kw: Any) -> LlamaConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Build from a Hugging Face `config.json` dictionary; raises ConfigError for non-Llama models."""
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        if model_type not in (None, "llama", "mistral") or (archs and not set(archs) & set(LLAMA_FAMILY)):
            raise ConfigError(
                f"not a Llama-family model: model_type={model_type!r}, architectures={archs!r}; "
                f"dsla-jax supports {', '.join(LLAMA_FAMILY)}"
            )
        rs = d.get("rope_scaling") or None
        if d.get("rope_parameters") and not rs:  # transformers >= 5 layout
            rp = d["rope_parameters"]
            if rp.get("rope_type", "default") != "default":
                rs = rp
            d = {**d, "rope_theta": rp.get("rope_theta", d.get("rope_theta", 10000.0))}
        scaling = None
        if rs:
            kind = rs.get("rope_type", rs.get("type"))
            if kind != "llama3":
                raise ConfigError(f"rope_scaling type {kind!r} is not supported (only 'llama3')")
            scaling = RopeScaling(
                factor=float(rs["factor"]),
                low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
            )
        eos = d.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = tuple(eos)
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=int(d["num_attention_heads"]),
            num_key_value_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
            head_dim=d.get("head_dim"),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
            dsla_layers=tuple(d.get("dsla_layers", ())),
            dsla_grouped=bool(d.get("dsla_grouped", True)),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A `config.json` dictionary that transformers' LlamaForCausalLM loads."""
        d: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
        }
        if self.rope_scaling is not None:
            d["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
        if self.dsla_layers:
            d["dsla_layers"] = list(self.dsla_layers)
            d["dsla_grouped"] = self.dsla_grouped
        return d


def parse_layers(spec: str | None, num_layers: int) -> tuple[int, ...]:
    """Layer-set syntax of the command lines: "" / "none", "all", "every-other" (0, 2, 4, ...), "first:N", "last:N",
    "frac:0.5" (the first half, rounded), or a comma list "0,3,5". Raises ConfigError on indices out of range."""
    spec = (spec or "").strip().lower()
    if spec in ("", "none"):
        layers: tuple[int, ...] = ()
    elif spec == "all":
        layers = tuple(range(num_layers))
    elif spec == "every-other":
        layers = tuple(range(0, num_layers, 2))
    elif spec.startswith(("first:", "last:", "frac:")):
        kind, _, value = spec.partition(":")
        try:
            n = round(float(value) * num_layers) if kind == "frac" else int(value)
        except ValueError:
            raise ConfigError(f"bad layer spec {spec!r}") from None
        if not 0 <= n <= num_layers:
            raise ConfigError(f"layer spec {spec!r} asks for {n} of {num_layers} layers")
        layers = tuple(range(n)) if kind != "last" else tuple(range(num_layers - n, num_layers))
    else:
        try:
            layers = tuple(int(x) for x in spec.split(",") if x.strip())
        except ValueError:
            raise ConfigError(
                f"bad layer spec {spec!r}: use none, all, every-other, first:N, last:N, frac:F or a list like 0,2,5"
            ) from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"layers {bad} out of range for a model with {num_layers} layers")
    return tuple(sorted(set(layers)))
