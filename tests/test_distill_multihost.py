"""Multi-host distillation: two processes (2 CPU devices each, joined by `jax.distributed` over gloo) give the same
run as one process with 4 devices. The processes are real `python -m train.distill` runs over a local socket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from dsla_jax.training.tiny import tiny_config, tiny_corpus, tiny_model_dir

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], out: Path, devices: int, extra_env: dict[str, str]) -> subprocess.Popen:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        **extra_env,
    }
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        if key not in extra_env:
            env.pop(key, None)
    log = open(out.parent / f"{out.name}-{extra_env.get('JAX_PROCESS_ID', 'single')}.log", "w")
    cmd = [sys.executable, "-m", "train.distill", *args, f"out_dir={out}"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    model = tiny_model_dir(tmp_path / "model", tiny_config(layers=3))
    corpus = tiny_corpus(tmp_path / "corpus", docs=8, words=300)
    args = [
        "--config",
        "configs/base.yaml",
        f"model.spec={model}",
        "model.dsla_impl=xla",
        "model.dsla_chunk_size=16",
        f"data.sources=[{corpus}]",
        "data.seq_len=32",
        "data.heldout_fraction=0.0",
        "chain.ordering=explicit",
        "chain.layers=[2,0]",
        "chain.stages=[2]",
        "chain.steps_per_layer=3",
        "chain.calibration_rows=2",
        "train.batch_size=4",
        "optim.warmup_steps=1",
        "optim.lr=0.01",
        "checkpoint.export_hf=false",
        "log.progress=false",
        "eval.sources=[]",
    ]
    coord = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}", "JAX_NUM_PROCESSES": "2"}
    procs = [
        launch(args, tmp_path / "single", 4, {}),
        *(launch(args, tmp_path / "multi", 2, {**coord, "JAX_PROCESS_ID": str(i)}) for i in range(2)),
    ]
    codes = [p.wait(timeout=600) for p in procs]
    logs = {p.name: p.read_text() for p in tmp_path.glob("*.log")}
    assert codes == [0, 0, 0], logs
    assert "2 of 3 layers converted" in logs["multi-0.log"], logs["multi-0.log"]
    single = load_file(str(tmp_path / "single" / "final" / "dsla.safetensors"))
    multi = load_file(str(tmp_path / "multi" / "final" / "dsla.safetensors"))
    assert single.keys() == multi.keys()
    # float32 reductions over the 4 devices are grouped differently across processes, and Adam turns the tiny
    # gradient differences into update differences of up to a fraction of lr where a gradient sits near zero
    # (measured on a 2-core CPU host: max 2.7e-4, mean <= 9.3e-7 per tensor, with lr = 1e-2; the old bound of 2e-4 x
    # the tensor's largest value failed there on a bias). A run that trained on other data or skipped the all-reduce
    # moves most elements by ~lr, so both bounds below still catch it.
    lr = 1e-2
    for key in single:
        diff = np.abs(single[key] - multi[key])
        assert float(np.mean(diff)) <= 1e-3 * lr, (key, float(np.mean(diff)))
        assert float(np.max(diff)) <= 0.1 * lr, (key, float(np.max(diff)))
    # process 0 alone writes the outputs; both processes trained
    assert (tmp_path / "multi" / "metrics.jsonl").is_file()
