"""Per-kernel time of one DSLA layer's forward or forward + backward, from a JAX profiler trace.

    python -m bench.kernel_profile [--shape B1T8192] [--pass fwd|fwdbwd] [--steps 5] [--out profile.json]
                                   [--config rec=triton,bwd_adjoints_mosaic=false]

Runs the Pallas path (`dsla_attention_pallas`, H=32, D=128, bfloat16, GLA-style gates, as `bench.kernels`) for a few
steps under `jax.profiler.trace`, reads the trace back with `jax.profiler.ProfileData` and sums the device events
(kernels: Pallas calls by their names, XLA fusions, copies) per name. Prints a table (name, launches per step, ms per
step, share of the step's kernel time) and writes it as JSON. On a CPU the device plane is absent: the tool says so
(the table needs a GPU or TPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import tempfile
from collections import defaultdict

import jax
import jax.numpy as jnp


def parse_config(text: str | None):
    """ "rec=triton,bwd_adjoints_mosaic=false" -> GpuConfig with those fields (ints, floats, booleans, None parsed)."""
    from dsla_jax.ops.dsla.pallas_gpu import GpuConfig

    if not text:
        return None
    fields = {f.name for f in dataclasses.fields(GpuConfig)}
    kw = {}
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise SystemExit(f"--config: {item!r} is not FIELD=VALUE with a GpuConfig field ({sorted(fields)})")
        low = raw.strip().lower()
        if low in ("true", "false"):
            kw[key] = low == "true"
        elif low == "none":
            kw[key] = None
        else:
            try:
                kw[key] = int(raw)
            except ValueError:
                try:
                    kw[key] = float(raw)
                except ValueError:
                    kw[key] = raw.strip()
    return GpuConfig(**kw)


def device_events(trace_dir: str) -> tuple[dict[str, list[float]], list[str]]:
    """Durations (ms) of the kernels on the device planes of the trace in `trace_dir`, by name, and the names of the
    lines read. The kernel lines are the "Stream" lines (GPU); where a plane has none, every line but the op /
    module / step summaries."""
    from jax.profiler import ProfileData

    paths = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    if not paths:
        raise RuntimeError(f"no .xplane.pb trace under {trace_dir}")
    events: dict[str, list[float]] = defaultdict(list)
    read: list[str] = []
    summaries = ("xla ops", "xla modules", "steps", "framework", "launch stats")
    for path in paths:
        for plane in ProfileData.from_file(path).planes:
            if not plane.name.startswith("/device:"):
                continue
            lines = list(plane.lines)
            kernels = [ln for ln in lines if "stream" in ln.name.lower()]
            kernels = kernels or [ln for ln in lines if not any(w in ln.name.lower() for w in summaries)]
            for line in kernels:
                read.append(f"{plane.name} {line.name}")
                for ev in line.events:
                    events[ev.name].append(ev.duration_ns / 1e6)
    return events, read


def profile(step, args: tuple, steps: int) -> tuple[list[dict], list[str]]:
    """Rows (name, launches per step, ms per step, share) for `steps` calls of `step(*args)` after a warm-up, and
    the trace lines they came from."""
    jax.block_until_ready(step(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(steps):
                jax.block_until_ready(step(*args))
        events, lines = device_events(d)
    total = sum(sum(v) for v in events.values())
    rows = [
        dict(name=name, launches=len(ds) / steps, ms=sum(ds) / steps, share=sum(ds) / total if total else 0.0)
        for name, ds in events.items()
    ]
    return sorted(rows, key=lambda r: -r["ms"]), lines


def main(argv=None) -> None:
    from bench import kernels as bk

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="B1T8192", help="BxTy, e.g. B1T8192")
    ap.add_argument("--pass", dest="pass_", choices=("fwd", "fwdbwd"), default="fwdbwd")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--config", default=None, help="GpuConfig overrides, FIELD=VALUE,...")
    ap.add_argument("--out", default="kernel_profile.json")
    a = ap.parse_args(argv)
    try:
        B, T = (int(x) for x in a.shape.upper()[1:].split("T"))
    except ValueError:
        raise SystemExit(f"--shape must look like B1T8192, got {a.shape!r}") from None
    cfg = parse_config(a.config)
    backend = jax.default_backend()
    if backend == "cpu":
        raise SystemExit("bench.kernel_profile times device kernels: it needs a GPU or TPU (JAX found only a CPU)")
    args = bk.make_inputs(B, T)
    fn = bk.pallas_fn(cfg, False, 64)
    if a.pass_ == "fwd":
        step, step_args = jax.jit(fn), args
    else:
        ct = jax.random.normal(jax.random.key(1), (B, T, bk.H, bk.D), jnp.float32)
        step, step_args = bk._fwd_bwd(fn), (*args, ct)
    rows, lines = profile(step, step_args, a.steps)
    if not rows:
        raise SystemExit(f"the trace held no device kernels (lines read: {lines})")
    total = sum(r["ms"] for r in rows)
    print(f"| kernel ({a.pass_}, B{B} T{T}, {jax.devices()[0].device_kind}) | launches / step | ms / step | share |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['name'][:80]} | {r['launches']:g} | {r['ms']:.3f} | {100 * r['share']:.1f}% |")
    print(f"| total | | {total:.3f} | |")
    device = jax.devices()[0].device_kind
    meta = dict(shape=[B, T], pass_=a.pass_, steps=a.steps, device=device, config=a.config, lines=lines)
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows, total_ms=total), f, indent=1)


if __name__ == "__main__":
    main()
