"""`python -m bench.kernels` runs end to end on the CPU (Pallas interpreter, tiny shapes): every row it writes has a
time and no error, so a broken variant or a changed kernel signature shows here and not on a lent GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO


def _run(tmp_path, *args: str) -> list[dict]:
    out = tmp_path / "rows.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.kernels", *args, "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| impl | B | T |" in proc.stdout + proc.stderr  # the printed table
    rows = json.loads(out.read_text())["rows"]
    errors = {r["impl"]: r["error"] for r in rows if "error" in r}
    assert not errors, errors
    assert all(r["ms"] > 0 for r in rows)
    return rows


def test_table_runs(tmp_path):
    rows = _run(tmp_path, "--no-fla")
    passes = {(r["impl"], r["pass_"]) for r in rows}
    for need in [("pallas", "fwd"), ("pallas", "fwd+bwd"), ("pallas g=-50", "fwd+bwd"), ("pallas decode", "decode")]:
        assert need in passes, sorted(passes)


def test_quick_sweep_runs_and_picks_a_config(tmp_path):
    rows = _run(tmp_path, "--sweep", "--quick")
    names = {r["impl"] for r in rows}
    assert any(n.startswith("bwd part dqk+dv") for n in names), names
    assert any(n.startswith("pallas bwd split") for n in names), names
    assert all(r["err_vs_xla"] < 2e-3 for r in rows if r.get("err_vs_xla") is not None)

    sys.path.insert(0, str(REPO))
    from bench.kernels import config_from_sweep

    cfg = config_from_sweep(str(tmp_path / "rows.json"))
    assert cfg is not None and cfg.fwd == "split" and cfg.bwd == "split"


def test_config_from_sweep_carries_the_backward_picks_own_fields(tmp_path):
    """A backward pick that differs from the default only in a backward-only field (here `save_states`,
    `states_block_k`) brings that field into the config; the forward's fields come from the forward pick."""
    sys.path.insert(0, str(REPO))
    from bench.kernels import config_from_sweep

    rows = [
        {"impl": "pallas split C64 V64 w8 iw4", "pass_": "fwd", "ms": 1.0, "err_vs_xla": 1e-3},
        {"impl": "pallas bwd split C64 V32 w8", "pass_": "fwd+bwd", "ms": 8.0},
        {"impl": "pallas bwd split C64 V32 w8 save", "pass_": "fwd+bwd", "ms": 7.0},
    ]
    (tmp_path / "rows.json").write_text(json.dumps({"rows": rows}))
    cfg = config_from_sweep(str(tmp_path / "rows.json"))
    assert cfg.save_states and cfg.intra_num_warps == 4
    rows[2] = {"impl": "pallas bwd split C64 V32 w8 sK32 rw4", "pass_": "fwd+bwd", "ms": 7.0}
    (tmp_path / "rows.json").write_text(json.dumps({"rows": rows}))
    cfg = config_from_sweep(str(tmp_path / "rows.json"))
    assert cfg.states_block_k == 32 and not cfg.save_states and cfg.rec_num_warps == 8  # rec warps: the forward's
