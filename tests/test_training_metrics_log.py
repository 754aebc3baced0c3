"""The metrics log: JSONL always, TensorBoard event files when `log.tensorboard` is on."""

from __future__ import annotations

import json

import pytest

from dsla_jax.training.metrics_log import MetricsLog


def test_jsonl_and_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboardX")  # pinned in requirements-dev.txt: CI has it
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=True)
    log.write("step", global_step=1, loss=2.5, kl=0.25, skipped=False)
    log.write("transfer", step=3, loss=0.75)
    log.write("eval", name="teacher", results={})
    log.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records] == ["step", "transfer", "eval"]
    assert records[0]["loss"] == 2.5 and records[1]["step"] == 3
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    data = events[0].read_bytes()
    for tag in (b"train/loss", b"train/kl", b"transfer/loss"):
        assert tag in data, tag
    assert b"train/skipped" not in data  # booleans are not scalars


def test_disabled_log_writes_nothing(tmp_path):
    log = MetricsLog(tmp_path / "sub" / "metrics.jsonl", tensorboard=True, enabled=False)
    log.write("step", global_step=1, loss=1.0)
    log.close()
    assert not (tmp_path / "sub").exists()
