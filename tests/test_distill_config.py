"""Distillation configs: every shipped YAML loads and validates; base.yaml documents every key with its default."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from dsla_jax.training.config import DistillConfig, DistillConfigError, config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, DistillConfig)
    assert cfg.to_dict()["model"]["spec"]


def test_shipped_set_is_complete():
    names = {p.name for p in SHIPPED}
    assert {"base.yaml", "smollm2_demo.yaml", "smollm2_gpu.yaml", "llama2_7b.yaml", "llama3_8b.yaml"} <= names


def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out |= _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


def test_base_yaml_is_the_defaults_and_names_every_key():
    raw = yaml.safe_load((CONFIGS / "base.yaml").read_text())
    assert _keys(raw) == _keys(DistillConfig().to_dict())
    assert load_config(CONFIGS / "base.yaml") == DistillConfig()


def test_every_key_in_base_yaml_has_a_comment():
    for line in (CONFIGS / "base.yaml").read_text().splitlines():
        if ":" in line and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line, f"base.yaml key without a comment: {line!r}"


def test_overrides_are_typed():
    cfg = load_config(
        CONFIGS / "smollm2_demo.yaml",
        ["optim.lr=1e-4", "chain.layers=[3, 1]", "chain.ordering=explicit", "data.sources=[a.txt]", "model=foo"],
    )
    assert cfg.optim.lr == pytest.approx(1e-4) and cfg.chain.layers == (3, 1)
    assert cfg.data.sources == ("a.txt",) and cfg.model.spec == "foo"
    assert cfg.model.dsla_impl == "xla"  # the rest of the model section is kept


@pytest.mark.parametrize(
    ("values", "overrides", "message"),
    [
        ({}, ["optim.warmup=5"], r"unknown config key optim\.warmup; did you mean optim\.warmup_steps\?"),
        ({}, ["bogus.key=1"], r"unknown config key bogus; known keys: out_dir, "),
        ({}, ["train.batch_size=two"], r"train\.batch_size: expected an integer, got 'two'"),
        ({}, ["train.batch_size=6", "train.grad_accum=4"], r"train\.batch_size: 6 is not a multiple"),
        ({}, ["loss.hidden_loss=l1"], r"loss\.hidden_loss: 'l1' is not one of mse, kl"),
        ({}, ["chain.ordering=explicit"], r"chain\.layers: ordering=explicit needs layers"),
        ({}, ["chain.layers=[1, 1]"], r"chain\.layers: \[1, 1\] repeats a layer"),
        ({}, ["chain.stages=[0.5, 0.25]"], r"chain\.stages: .* must be increasing"),
        ({}, ["mesh.model=0"], r"mesh\.model: 0 must be >= 1"),
        ({}, ["transfer.steps=-1"], r"transfer\.steps: must be >= 0"),
        ({}, ["transfer.lr=0"], r"transfer\.lr: must be > 0"),
        ({}, ["transfer.batch_size=6", "transfer.grad_accum=4"], r"transfer\.batch_size: 6 is not a multiple"),
        ({}, ["transfer.steps=5", "transfer.grad_accum=3"], r"transfer\.grad_accum: 3 does not divide train\.batch"),
        ({}, ["transfer.step=5"], r"unknown config key transfer\.step; did you mean transfer\.steps\?"),
        ({"model": {"mixer": "gla"}}, ["loss.lambda_gate=0.1"], r"gate-diversity term needs two states"),
        ({"train": 3}, [], r"train: expected a mapping"),
        ({}, ["nonsense"], r"not of the form section\.key=value"),
    ],
)
def test_clear_config_errors(values, overrides, message):
    with pytest.raises(DistillConfigError, match=message):
        config_from_dict(values, overrides)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DistillConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_config_round_trips_through_a_dict():
    cfg = load_config(CONFIGS / "smollm2_gpu.yaml")
    assert config_from_dict(cfg.to_dict()) == cfg
    assert dataclasses.replace(cfg, out_dir="x").out_dir == "x"


def test_docs_describe_every_key():
    doc = (CONFIGS.parent / "docs" / "distill.md").read_text()
    missing = sorted(k for k in _keys(DistillConfig().to_dict()) if f"`{k}`" not in doc)
    assert not missing, f"docs/distill.md does not describe {missing}"
