"""End-to-end distillation on a tiny random model: the CLI, the chain order, untouched layers, kill + resume,
NaN handling and clear errors. Runs share one persistent compilation cache, so identical steps compile once."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache
from safetensors.numpy import load_file

from dsla_jax.checkpoints import load_checkpoint
from dsla_jax.checkpoints.dsla_params import load_dsla_params
from dsla_jax.models.weights import llama_state_dict
from dsla_jax.training import NonFiniteLoss, RunError, load_distilled, run_distillation
from dsla_jax.training import losses as losses_module
from dsla_jax.training.checkpoint import CheckpointMismatch
from dsla_jax.training.config import DistillConfigError, config_from_dict
from dsla_jax.training.data import DataError
from dsla_jax.training.sharding import MeshError
from dsla_jax.training.tiny import tiny_config, tiny_corpus, tiny_model_dir
from train import distill

ORDER = [2, 0]
BASE_YAML = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    previous = jax.config.jax_compilation_cache_dir
    yield {
        "model": tiny_model_dir(root / "model", tiny_config(layers=3)),
        "other": tiny_model_dir(root / "other", tiny_config(layers=3), seed=1),
        "corpus": tiny_corpus(root / "corpus", docs=8, words=300),
        "cache": root / "jax_cache",  # the runs set it as JAX's persistent cache: undone after this module
    }
    jax.config.update("jax_compilation_cache_dir", previous)
    compilation_cache.reset_cache()


def overrides(assets, out: Path, **extra) -> list[str]:
    """A tiny run: 3 layers, chain [2, 0] (explicit), 3 steps per layer, 2 micro-batches of 2 rows of 32 tokens."""
    base = {
        "out_dir": out,
        "compile_cache": assets["cache"],
        "model.spec": assets["model"],
        "model.dsla_impl": "xla",
        "model.dsla_chunk_size": 16,
        "data.sources": f"[{assets['corpus']}]",
        "data.seq_len": 32,
        "data.heldout_fraction": 0.0,
        "chain.ordering": "explicit",
        "chain.layers": "[2, 0]",
        "chain.stages": "[2]",
        "chain.steps_per_layer": 3,
        "chain.calibration_rows": 2,
        "train.batch_size": 4,
        "train.grad_accum": 2,
        "optim.warmup_steps": 1,
        "optim.lr": 0.01,
        "checkpoint.export_hf": "false",
        "log.progress": "false",
        **extra,
    }
    return [f"{k}={v}" for k, v in base.items()]


def cfg_of(assets, out: Path, **extra):
    """The config the CLI would build from `overrides(...)` (same parser)."""
    return config_from_dict({}, overrides(assets, out, **extra))


def final_tensors(out: Path) -> dict[str, np.ndarray]:
    return load_file(str(out / "final" / "dsla.safetensors"))


# ---- the CLI, the chain and what it leaves untouched ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    args = overrides(
        assets,
        out,
        **{
            "chain.steps_per_layer": 1,
            "chain.stages": "[1, 2]",
            "data.heldout_fraction": 0.1,
            "eval.window": 32,
            "eval.max_tokens": 256,
            "checkpoint.export_hf": "true",
        },
    )
    assert distill.main(["--config", str(BASE_YAML), *args]) == 0
    return out


def test_cli_two_step_run_writes_everything(cli_run):
    summary = json.loads((cli_run / "summary.json").read_text())
    assert summary["complete"] and summary["steps"] == 2 and summary["dsla_layers"] == [0, 2]
    assert [r["name"] for r in summary["evals"]] == ["teacher", "fresh 2/3", "trained 1/3", "trained 2/3"]
    assert all(np.isfinite(r["results"]["heldout"]["ppl"]) for r in summary["evals"])
    steps = [json.loads(line) for line in (cli_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["event"] == "step"]
    for key in ("loss", "ce", "kl", "hidden", "gate", "grad_norm", "tokens_per_s", "step_s", "lr"):
        assert all(np.isfinite(r[key]) for r in steps), key
    meta, _ = load_dsla_params(cli_run / "stages" / "1_layers")
    assert meta["dsla_layers"] == [2] and meta["order"][:2] == ORDER
    assert (cli_run / "final" / "hf" / "config.json").is_file()


def test_chain_follows_the_order_and_leaves_other_layers_untouched(cli_run, assets):
    steps = [json.loads(x) for x in (cli_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["layer"] for r in steps if r["event"] == "step"] == ORDER
    hybrid, _ = load_distilled(cli_run / "final")
    assert hybrid.config.dsla_layers == (0, 2)
    _, teacher = load_checkpoint(assets["model"])
    exported = llama_state_dict(hybrid)
    for name, value in teacher.items():  # attention of layer 1, every MLP and norm, embeddings: bit-identical
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    trained = final_tensors(cli_run)
    assert {k.split(".")[2] for k in trained} == {"0", "2"}
    # and the HF export loads as the same hybrid
    from dsla_jax.loading import load_model

    again, _ = load_model(cli_run / "final" / "hf")
    tokens = jnp.asarray(np.arange(40).reshape(2, 20) % 100)
    np.testing.assert_array_equal(again.logits(again(tokens)[0]), hybrid.logits(hybrid(tokens)[0]))


# ---- kill and resume -------------------------------------------------------------------------------------------------


class Killed(Exception):
    pass


def test_killed_and_resumed_run_equals_uninterrupted(assets, tmp_path, capsys):
    extra = {"checkpoint.every_steps": 2}
    whole = tmp_path / "whole"
    run_distillation(cfg_of(assets, whole, **extra))

    def kill_after_5(step: int) -> None:
        if step == 5:  # checkpoints at 2, 3 (end of layer 2) and 4 (mid-layer); step 5 is lost
            raise Killed

    parts = tmp_path / "parts"
    with pytest.raises(Killed):
        run_distillation(cfg_of(assets, parts, **extra), after_step=kill_after_5)
    with pytest.raises(RunError, match="pass --resume"):
        run_distillation(cfg_of(assets, parts, **extra))
    summary = run_distillation(cfg_of(assets, parts, **extra), resume=True)
    assert summary["steps"] == 6
    a, b = final_tensors(whole), final_tensors(parts)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert all(np.abs(v).max() > 0 for k, v in a.items() if k.endswith("alpha"))  # trained (alpha starts at 0)
    assert "resumed from step 4: chain step 2/2, step 1" in capsys.readouterr().out


def test_resume_after_the_attention_transfer_does_not_redo_it(assets, tmp_path, capsys):
    extra = {"transfer.steps": 4, "transfer.lr": 0.01, "transfer.warmup_steps": 1}
    whole = tmp_path / "whole"
    summary = run_distillation(cfg_of(assets, whole, **extra))
    chain_tokens = 6 * 4 * 32
    assert summary["transfer_tokens"] == 4 * 4 * 32
    assert summary["training_tokens"] == chain_tokens + summary["transfer_tokens"]

    def kill_after_1(step: int) -> None:
        if step == 1:  # only the checkpoint written after the transfer (step 0) exists
            raise Killed

    parts = tmp_path / "parts"
    with pytest.raises(Killed):
        run_distillation(cfg_of(assets, parts, **extra), after_step=kill_after_1)
    again = run_distillation(cfg_of(assets, parts, **extra), resume=True)
    assert "resumed from step 0: chain step 1/2, step 0" in capsys.readouterr().out
    records = [json.loads(x) for x in (parts / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "transfer"] == [1, 2, 3, 4]  # not redone
    assert again["training_tokens"] == summary["training_tokens"]
    a, b = final_tensors(whole), final_tensors(parts)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_every_stage_is_evaluated_right_after_the_transfer(assets, tmp_path):
    extra = {
        "transfer.steps": 2,
        "chain.stages": "[1, 2]",
        "chain.steps_per_layer": 1,
        "eval.sources": f"[{assets['corpus']}]",
        "eval.window": 32,
        "eval.max_tokens": 256,
    }
    summary = run_distillation(cfg_of(assets, tmp_path / "run", **extra))
    names = [e["name"] for e in summary["evals"]]
    assert names == ["teacher", "fresh 2/3", "transferred 1/3", "transferred 2/3", "trained 1/3", "trained 2/3"]
    transferred = {e["name"]: e for e in summary["evals"] if e["name"].startswith("transferred")}
    assert transferred["transferred 1/3"]["layers"] == ORDER[:1]
    assert transferred["transferred 2/3"]["layers"] == ORDER
    assert all(e["tokens"] == summary["transfer_tokens"] for e in transferred.values())


def test_resume_refuses_another_model(assets, tmp_path):
    out = tmp_path / "run"
    run_distillation(cfg_of(assets, out, **{"chain.steps_per_layer": 1, "chain.stages": "[1]"}))
    with pytest.raises(CheckpointMismatch, match="different model .same architecture, different weights"):
        run_distillation(cfg_of(assets, out, **{"model.spec": assets["other"]}), resume=True)


# ---- NaN handling --------------------------------------------------------------------------------------------------


@pytest.fixture
def nan_at_step_1(monkeypatch):
    """The loss becomes NaN at step 1 (0-based) of every layer: the lambda factor is NaN there."""
    real = losses_module.lambda_factor

    def factor(cfg, step, total):
        return jnp.where(step == 1, jnp.nan, real(cfg, step, total))

    monkeypatch.setattr(losses_module, "lambda_factor", factor)


def test_nan_stops_without_writing_a_checkpoint(assets, tmp_path, nan_at_step_1):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match=r"loss is nan .* at step 2 .*last checkpoint: step 1\)"):
        run_distillation(cfg_of(assets, out, **{"checkpoint.every_steps": 1}))
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
    nan_records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in nan_records if r["event"] == "nan"] == [2]


def test_nan_skip_leaves_the_step_unapplied(assets, tmp_path, nan_at_step_1):
    out = tmp_path / "run"
    summary = run_distillation(cfg_of(assets, out, **{"train.on_nan": "skip"}))
    assert summary["skipped_steps"] == 2
    assert all(np.isfinite(v).all() for v in final_tensors(out).values())


# ---- clear errors before any training --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [
        ({"chain.layers": "[2, 3]"}, DistillConfigError, r"chain.layers names layer 3, but the model has 3 layers"),
        ({"chain.stages": "[4]"}, DistillConfigError, r"chain.stages: 4 asks for 4 layers, but the model has 3"),
        ({"data.seq_len": 100000}, DataError, r"not enough for one row of data.seq_len=100000"),
        ({"train.batch_size": 512, "train.grad_accum": 1}, DataError, r"fewer than one batch of 512"),
        ({"mesh.model": 3}, MeshError, r"mesh.model=3 does not divide the 1 available devices"),
    ],
)
def test_clear_errors(assets, tmp_path, extra, error, message):
    cfg = cfg_of(assets, tmp_path / "run", **extra)
    with pytest.raises(error, match=message):
        run_distillation(cfg)
