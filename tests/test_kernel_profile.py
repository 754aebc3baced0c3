"""`bench.kernel_profile`: its config parsing, its trace reader on a real (CPU) profiler trace, and its refusal on a
CPU-only host."""

from __future__ import annotations

import tempfile

import jax
import jax.numpy as jnp
import pytest

from bench import kernel_profile as kp


def test_parse_config_types_and_errors():
    cfg = kp.parse_config("rec=triton,bwd_adjoints_mosaic=false,block_v=32,exact_block_k=none,thresh=30.5")
    assert (cfg.rec, cfg.bwd_adjoints_mosaic, cfg.block_v, cfg.exact_block_k, cfg.thresh) == (
        "triton",
        False,
        32,
        None,
        30.5,
    )
    assert kp.parse_config(None) is None and kp.parse_config("") is None
    for bad in ("nosuchfield=1", "block_v"):
        with pytest.raises(SystemExit, match="GpuConfig field"):
            kp.parse_config(bad)


def test_device_events_reads_a_real_trace():
    """On a CPU trace there is no device plane: no kernel events, and the host plane is not mistaken for one."""
    f = jax.jit(lambda x: jnp.sin(x) @ x)
    x = jnp.ones((64, 64))
    f(x).block_until_ready()
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            f(x).block_until_ready()
        events, lines = kp.device_events(d)
    assert dict(events) == {} and lines == []
    with tempfile.TemporaryDirectory() as d, pytest.raises(RuntimeError, match="no .xplane.pb"):
        kp.device_events(d)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU refusal")
def test_cli_refuses_cpu_and_bad_shape():
    with pytest.raises(SystemExit, match="--shape"):
        kp.main(["--shape", "8192"])
    with pytest.raises(SystemExit, match="needs a GPU or TPU"):
        kp.main(["--shape", "B1T128"])
