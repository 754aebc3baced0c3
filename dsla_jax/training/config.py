"""Typed distillation config: nested frozen dataclasses loaded from YAML, with `section.key=value` overrides.

    cfg = load_config("configs/smollm2_demo.yaml", ["train.steps_per_layer=5", "chain.stages=[2]"])

Every key, its default and its meaning are in `configs/base.yaml` (a test keeps the two in sync). Unknown keys, wrong
types and inconsistent values raise `DistillConfigError` with the dotted key name in the message.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class DistillConfigError(ValueError):
    """A distillation config that cannot run; the message names the key."""


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise DistillConfigError(f"{key}: {msg}")


def _one_of(value: str, key: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, f"{value!r} is not one of {', '.join(choices)}")


DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class ModelSection:
    spec: str = "smollm2-135m"
    dtype: str = "float32"
    frozen_dtype: str = "float32"
    mixer: str = "dsla"
    dsla_grouped: bool = True
    dsla_impl: str = "auto"
    dsla_chunk_size: int = 64

    def __post_init__(self) -> None:
        _check(bool(self.spec), "model.spec", "must name a model (alias, HF directory or .gguf file)")
        _one_of(self.dtype, "model.dtype", DTYPES)
        _one_of(self.frozen_dtype, "model.frozen_dtype", DTYPES)
        _one_of(self.mixer, "model.mixer", ("dsla", "gla"))
        _one_of(self.dsla_impl, "model.dsla_impl", ("auto", "naive", "xla", "xla_fused", "xla_two"))
        _check(self.dsla_chunk_size >= 1, "model.dsla_chunk_size", "must be >= 1")


@dataclass(frozen=True)
class DataSection:
    sources: tuple[str, ...] = ("builtin:hamlet",)
    text_field: str = "text"
    hf_split: str = "train"
    seq_len: int = 512
    packing: str = "pack"
    shuffle: bool = True
    seed: int = 0
    max_tokens: int = 0
    heldout_fraction: float = 0.05

    def __post_init__(self) -> None:
        _check(len(self.sources) > 0, "data.sources", "needs at least one text source")
        _check(self.seq_len >= 2, "data.seq_len", f"{self.seq_len} must be >= 2")
        _one_of(self.packing, "data.packing", ("pack", "split"))
        _check(self.max_tokens >= 0, "data.max_tokens", "must be >= 0 (0 = no limit)")
        _check(0.0 <= self.heldout_fraction < 1.0, "data.heldout_fraction", "must be in [0, 1)")


@dataclass(frozen=True)
class ChainSection:
    ordering: str = "entropy"
    layers: tuple[int, ...] = ()
    stages: tuple[float, ...] = (0.5,)
    steps_per_layer: int = 100
    calibrate: bool = True
    calibration_rows: int = 8
    train_previous: bool = True
    train_mlp: bool = False
    train_norms: bool = False

    def __post_init__(self) -> None:
        _one_of(self.ordering, "chain.ordering", ("entropy", "sensitivity", "explicit"))
        _check(not (self.ordering == "explicit" and not self.layers), "chain.layers", "ordering=explicit needs layers")
        _check(len(set(self.layers)) == len(self.layers), "chain.layers", f"{list(self.layers)} repeats a layer")
        _check(len(self.stages) > 0, "chain.stages", "needs at least one stage")
        _check(all(s > 0 for s in self.stages), "chain.stages", f"{list(self.stages)}: every stage must be > 0")
        _check(list(self.stages) == sorted(self.stages), "chain.stages", f"{list(self.stages)} must be increasing")
        _check(self.steps_per_layer >= 1, "chain.steps_per_layer", "must be >= 1")
        _check(self.calibration_rows >= 1, "chain.calibration_rows", "must be >= 1")


@dataclass(frozen=True)
class TransferSection:
    steps: int = 0
    lr: float = 1e-3
    warmup_steps: int = 10
    batch_size: int = 0
    grad_accum: int = 1
    clip_norm: float = 1.0

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "transfer.steps", "must be >= 0 (0 = no attention transfer)")
        _check(self.lr > 0, "transfer.lr", "must be > 0")
        _check(self.warmup_steps >= 0, "transfer.warmup_steps", "must be >= 0")
        _check(self.batch_size >= 0, "transfer.batch_size", "must be >= 0 (0 = train.batch_size)")
        _check(self.grad_accum >= 1, "transfer.grad_accum", "must be >= 1")
        _check(
            self.batch_size % self.grad_accum == 0,
            "transfer.batch_size",
            f"{self.batch_size} is not a multiple of transfer.grad_accum={self.grad_accum}",
        )
        _check(self.clip_norm >= 0, "transfer.clip_norm", "must be >= 0 (0 = no clipping)")


@dataclass(frozen=True)
class OrderingSection:
    cache_dir: str = ""
    prompts: int = 64
    prompt_len: int = 256
    sensitivity_tokens: int = 8192
    batch_size: int = 8

    def __post_init__(self) -> None:
        for name in ("prompts", "prompt_len", "sensitivity_tokens", "batch_size"):
            _check(getattr(self, name) >= 1, f"ordering.{name}", "must be >= 1")


@dataclass(frozen=True)
class OptimSection:
    lr: float = 1e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", "must be > 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(self.clip_norm >= 0, "optim.clip_norm", "must be >= 0 (0 = no clipping)")


@dataclass(frozen=True)
class TrainSection:
    batch_size: int = 8
    grad_accum: int = 1
    on_nan: str = "stop"
    remat: bool = False
    time_limit_s: float = 0.0

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        _check(
            self.batch_size % self.grad_accum == 0,
            "train.batch_size",
            f"{self.batch_size} is not a multiple of train.grad_accum={self.grad_accum}",
        )
        _one_of(self.on_nan, "train.on_nan", ("stop", "skip"))
        _check(self.time_limit_s >= 0, "train.time_limit_s", "must be >= 0 (0 = no limit)")


@dataclass(frozen=True)
class LossSection:
    lambda_ce: float = 1.0
    lambda_kl: float = 1.0
    temperature: float = 1.0
    lambda_hidden: float = 0.0
    hidden_loss: str = "mse"
    hidden_temperature: float = 1.0
    lambda_gate: float = 0.0
    decay: str = "none"
    decay_final: float = 0.0

    def __post_init__(self) -> None:
        for name in ("lambda_ce", "lambda_kl", "lambda_hidden", "lambda_gate"):
            _check(getattr(self, name) >= 0, f"loss.{name}", "must be >= 0")
        _check(self.temperature > 0, "loss.temperature", "must be > 0")
        _check(self.hidden_temperature > 0, "loss.hidden_temperature", "must be > 0")
        _one_of(self.hidden_loss, "loss.hidden_loss", ("mse", "kl"))
        _one_of(self.decay, "loss.decay", ("none", "cosine"))
        _check(0 <= self.decay_final <= 1, "loss.decay_final", "must be in [0, 1]")


@dataclass(frozen=True)
class MeshSection:
    data: int = -1
    model: int = 1
    distributed: str = "auto"

    def __post_init__(self) -> None:
        _check(self.data == -1 or self.data >= 1, "mesh.data", f"{self.data} must be >= 1 or -1 (all the rest)")
        _check(self.model >= 1, "mesh.model", f"{self.model} must be >= 1")
        _one_of(self.distributed, "mesh.distributed", ("auto", "on", "off"))


@dataclass(frozen=True)
class CheckpointSection:
    every_steps: int = 0
    keep: int = 2
    export_hf: bool = True

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, "checkpoint.every_steps", "must be >= 0 (0 = only after each layer)")
        _check(self.keep >= 1, "checkpoint.keep", "must be >= 1")


@dataclass(frozen=True)
class EvalSection:
    sources: tuple[str, ...] = ()
    window: int = 512
    max_tokens: int = 16384
    batch_size: int = 4
    before: bool = True

    def __post_init__(self) -> None:
        _check(self.window >= 2, "eval.window", "must be >= 2")
        _check(self.max_tokens >= 2, "eval.max_tokens", "must be >= 2")
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")


@dataclass(frozen=True)
class LogSection:
    every_steps: int = 1
    progress: bool = True
    tensorboard: bool = False

    def __post_init__(self) -> None:
        _check(self.every_steps >= 1, "log.every_steps", "must be >= 1")


@dataclass(frozen=True)
class DistillConfig:
    out_dir: str = "runs/distill"
    compile_cache: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    chain: ChainSection = field(default_factory=ChainSection)
    transfer: TransferSection = field(default_factory=TransferSection)
    ordering: OrderingSection = field(default_factory=OrderingSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    loss: LossSection = field(default_factory=LossSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    log: LogSection = field(default_factory=LogSection)

    def __post_init__(self) -> None:
        _check(bool(self.out_dir), "out_dir", "must be a directory path")
        if self.model.mixer == "gla" and self.loss.lambda_gate > 0:
            raise DistillConfigError("loss.lambda_gate: the gate-diversity term needs two states (model.mixer=dsla)")
        if self.transfer.steps and self.transfer.batch_size == 0:
            _check(
                self.train.batch_size % self.transfer.grad_accum == 0,
                "transfer.grad_accum",
                f"{self.transfer.grad_accum} does not divide train.batch_size={self.train.batch_size} "
                "(transfer.batch_size=0 takes it)",
            )

    @property
    def transfer_batch_size(self) -> int:
        """Rows per attention-transfer step (`transfer.batch_size`, or `train.batch_size` when 0)."""
        return self.transfer.batch_size or self.train.batch_size

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


# ---- building from dictionaries --------------------------------------------------------------------------------


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return [_to_plain(v) for v in x]
    return x


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` converted to the annotated type `tp` (int, float, bool, str, tuple[X, ...], a section)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and tp is ModelSection:  # `model: smollm2-135m` shorthand
            value = {"spec": value}
        _check(isinstance(value, dict), key, f"expected a mapping of keys, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is tuple:
        item = typing.get_args(tp)[0]
        if value is None:
            return ()
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        return _coerce(value, [a for a in typing.get_args(tp) if a is not type(None)][0], key)
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, str):
            try:
                value = float(value) if tp is float else int(value)
            except ValueError:
                pass
        ok = isinstance(value, int) and not isinstance(value, bool) or (tp is float and isinstance(value, float))
        _check(ok, key, f"expected {'a number' if tp is float else 'an integer'}, got {value!r}")
        return tp(value)
    if tp is str:
        _check(
            isinstance(value, (str, int, float)) and not isinstance(value, bool), key, f"expected text, got {value!r}"
        )
        return str(value)
    raise TypeError(f"unsupported config type {tp} for {key}")  # pragma: no cover - a programming error


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in values:
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(names)}"
            raise DistillConfigError(f"unknown config key {prefix}{k}{hint}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = d
    for p in parts[:-1]:
        nxt = node.get(p)
        if isinstance(nxt, str) and p == "model":
            nxt = {"spec": nxt}
        if not isinstance(nxt, dict):
            nxt = {}
        node[p] = nxt
        node = nxt
    if parts[-1] == "model" and isinstance(value, str) and isinstance(node.get("model"), dict):
        node["model"] = {**node["model"], "spec": value}  # `model=NAME` sets the spec, keeps the rest
    else:
        node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value` -> (dotted key, value parsed as YAML: numbers, booleans, [lists])."""
    if "=" not in text:
        raise DistillConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise DistillConfigError(f"override {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def config_from_dict(values: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> DistillConfig:
    """A validated config from a (YAML-shaped) dictionary plus `section.key=value` overrides."""
    values = dict(values or {})
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(values, key, value)
    try:
        return _build(DistillConfig, values)
    except TypeError as e:  # a section given a non-mapping
        raise DistillConfigError(str(e)) from e


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> DistillConfig:
    """Load `path` (YAML; None = all defaults) and apply `overrides`."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DistillConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise DistillConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(values, dict):
            raise DistillConfigError(f"{path}: the top level must be a mapping of sections")
    return config_from_dict(values, overrides)
