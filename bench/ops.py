"""Benchmark of the DSLA ops: token loop vs chunked XLA, forward and forward+backward, against softmax attention.

    python -m bench.ops                          # default shapes for the backend, table on stdout
    python -m bench.ops --json out.json          # also write the rows as JSON (with backend and device name)
    python -m bench.ops --shapes 1,8,64,2048     # B,H,D,T (several separated by ';')
    python -m bench.ops --variants               # also time both chunked forms (xla_fused, xla_two) and auto
    python -m bench.ops --tune --shapes ...      # sweep chunk/sub-chunk/block/unroll of the chunked path (last shape)
    python -m bench.ops --precision high         # matmul precision of the chunked path (utils.MATMUL_PRECISION)

Each row: wall time (median of --repeats runs after one warm-up, block_until_ready), compile time, the peak
temporary memory of the compiled executable (`memory_analysis().temp_size_in_bytes`, no run needed) and, for
forward rows, the RMS error relative to the token loop's output on the same inputs (`err`). Softmax
attention is `jax.nn.dot_product_attention(..., is_causal=True, implementation="xla")` at the same shapes. Inputs have
Hk = H and K = V = D; gates are log-sigmoid/16 of normals. Runs whose naive backward would hold T states per head can
be skipped above a length (--skip-naive-bwd-above T): their memory is still reported from the compile.

Figures behind the defaults (`utils.AUTO_IMPL`, `dsla.XLA_DEFAULT`, `gla.chunk.SUB_CHUNK/BLOCK_ELEMS`) are quoted
where those are defined. On a shared 2-core CPU timings move by +-30% from run to run: compare rows of one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from bench.common import rel_err
from dsla_jax.ops import utils
from dsla_jax.ops.dsla import dsla_attention
from dsla_jax.ops.dsla.chunk import chunk_dsla_fused, chunk_dsla_two

CPU_SHAPES = [(1, 8, 64, 512), (1, 8, 64, 2048), (1, 8, 64, 8192)]
PRECISIONS = {
    "highest": jax.lax.Precision.HIGHEST,
    "high": jax.lax.Precision.HIGH,
    "default": jax.lax.Precision.DEFAULT,
}
GPU_SHAPES = [(1, 32, 128, 2048), (1, 32, 128, 8192)]


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    shapes = []
    for part in text.split(";"):
        vals = tuple(int(x) for x in part.split(","))
        if len(vals) != 4:
            raise ValueError(f"--shapes wants B,H,D,T groups separated by ';', got {part!r}")
        shapes.append(vals)
    return shapes


def make_inputs(B: int, H: int, D: int, T: int, dtype) -> dict[str, jax.Array]:
    ks = jax.random.split(jax.random.key(0), 7)
    return dict(
        q=jax.random.normal(ks[0], (B, T, H, D), dtype),
        k=(jax.random.normal(ks[1], (B, T, H, D)) * D**-0.5).astype(dtype),
        v=jax.random.normal(ks[2], (B, T, H, D), dtype),
        g1=(jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H, D))) / 16).astype(dtype),
        g2=(jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, T, H, D)) + 3) / 16).astype(dtype),
        mix=jnp.array([0.4, 0.6], jnp.float32),
        ct=jax.random.normal(ks[5], (B, T, H, D), dtype),
    )


def dsla_fns(impl: str, **kw) -> tuple[Callable, Callable]:
    """(forward, forward+backward) of DSLA with `impl`; kw goes to the chunked forms when impl is a callable name."""
    direct = {"fused": chunk_dsla_fused, "two": chunk_dsla_two}

    def fwd(q, k, v, g1, g2, mix):
        if impl in direct:
            return direct[impl](q, k, v, g1, g2, mix, **kw)[0]
        return dsla_attention(q, k, v, g1, g2, mix, impl=impl, **kw)[0]

    def loss(q, k, v, g1, g2, mix, ct):
        return jnp.sum((fwd(q, k, v, g1, g2, mix) * ct).astype(jnp.float32))

    # value_and_grad: the loss value needs o, as a training step does (with `jax.grad` alone the loss is linear in
    # o and XLA drops what only feeds o; the figures in docs/benchmarks.md's ops section were taken that way).
    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5))
    return fwd, grad


def softmax_fns() -> tuple[Callable, Callable]:
    def fwd(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

    def loss(q, k, v, ct):
        return jnp.sum((fwd(q, k, v) * ct).astype(jnp.float32))

    return fwd, jax.value_and_grad(loss, argnums=(0, 1, 2))


def measure(fn: Callable, args: tuple, repeats: int, run: bool = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    out: dict[str, Any] = {
        "compile_s": round(compile_s, 3),
        "temp_bytes": int(mem.temp_size_in_bytes) if mem is not None else None,
        "time_ms": None,
    }
    if run:
        jax.block_until_ready(compiled(*args))  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t0)
        out["time_ms"] = round(1e3 * statistics.median(times), 3)
        out["times_ms"] = [round(1e3 * t, 3) for t in times]
    return out


def bench_shape(shape, dtype, repeats: int, impls: list[str], skip_naive_bwd_above: int | None) -> list[dict]:
    B, H, D, T = shape
    x = make_inputs(B, H, D, T, dtype)
    dsla_args = (x["q"], x["k"], x["v"], x["g1"], x["g2"], x["mix"])
    rows = []
    reference = None
    for impl in impls:
        fwd, grad = dsla_fns(impl)
        for mode, fn, args in (("fwd", fwd, dsla_args), ("fwd+bwd", grad, (*dsla_args, x["ct"]))):
            skip = impl == "naive" and mode == "fwd+bwd" and skip_naive_bwd_above is not None
            skip = skip and T > skip_naive_bwd_above
            row = dict(op="dsla", impl=impl, mode=mode, B=B, H=H, D=D, T=T)
            row.update(measure(fn, args, repeats, not skip))
            if mode == "fwd":
                out = jax.jit(fn)(*args)
                if impl == "naive":
                    reference = out
                row["err"] = None if reference is None else rel_err(reference, out)
            rows.append(row)
            print(fmt_row(rows[-1]), flush=True)
    fwd, grad = softmax_fns()
    qkv = (x["q"], x["k"], x["v"])
    for mode, fn, args in (("fwd", fwd, qkv), ("fwd+bwd", grad, (*qkv, x["ct"]))):
        rows.append(dict(op="softmax", impl="xla", mode=mode, B=B, H=H, D=D, T=T, **measure(fn, args, repeats)))
        print(fmt_row(rows[-1]), flush=True)
    return rows


def tune(shape, dtype, repeats: int) -> list[dict]:
    """Sweep chunk size, sub-chunk size, block size and scan unroll of the fused chunked form at `shape`."""
    B, H, D, T = shape
    x = make_inputs(B, H, D, T, dtype)
    args = (x["q"], x["k"], x["v"], x["g1"], x["g2"], x["mix"])
    cpu = jax.default_backend() == "cpu"
    blocks = (1 << 20, 1 << 22) if cpu else (1 << 28,)
    unrolls = (1,) if cpu else (1, 8, 32)
    rows = []
    for chunk in (32, 64, 128):
        for sub in (4, 8, 16, 32):
            if sub > chunk or (cpu and sub == 32) or (not cpu and sub == 4):
                continue
            for block in blocks:
                for unroll in unrolls:
                    kw = dict(chunk_size=chunk, sub_chunk=sub, block_elems=block, unroll=unroll)
                    fwd, grad = dsla_fns("fused", **kw)
                    name = f"fused C{chunk} c{sub} b2^{block.bit_length() - 1} u{unroll}"
                    for mode, fn, a in (("fwd", fwd, args), ("fwd+bwd", grad, (*args, x["ct"]))):
                        row = dict(op="dsla", impl=name, mode=mode, B=B, H=H, D=D, T=T, **measure(fn, a, repeats))
                        rows.append(row)
                        print(fmt_row(row), flush=True)
    return rows


HEADER = (
    f"{'op':8s} {'impl':26s} {'mode':8s} {'B':>2s} {'H':>3s} {'D':>4s} {'T':>6s} "
    f"{'time ms':>10s} {'temp MiB':>10s} {'compile s':>9s} {'err':>8s}"
)


def fmt_row(r: dict) -> str:
    t = "skipped" if r["time_ms"] is None else f"{r['time_ms']:.1f}"
    m = "?" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.1f}"
    e = "" if r.get("err") is None else f"{r['err']:.1e}"
    return (
        f"{r['op']:8s} {r['impl']:26s} {r['mode']:8s} {r['B']:2d} {r['H']:3d} {r['D']:4d} {r['T']:6d} "
        f"{t:>10s} {m:>10s} {r['compile_s']:9.2f} {e:>8s}"
    )


def summary(rows: list[dict]) -> list[str]:
    """Ratios the issue asks about: chunked vs naive temp memory (fwd+bwd) and speed (fwd)."""
    lines = []
    by = {(r["op"], r["impl"], r["mode"], r["B"], r["H"], r["D"], r["T"]): r for r in rows}
    for (op, impl, mode, B, H, D, T), r in by.items():
        if op != "dsla" or impl != "xla":
            continue
        n = by.get((op, "naive", mode, B, H, D, T))
        if n is None:
            continue
        shape = f"B={B} H={H} D={D} T={T}"
        if mode == "fwd+bwd" and r["temp_bytes"] and n["temp_bytes"]:
            lines.append(f"{shape} fwd+bwd temp memory naive/xla = {n['temp_bytes'] / r['temp_bytes']:.1f}x")
        if r["time_ms"] and n["time_ms"]:
            lines.append(f"{shape} {mode} speed-up xla over naive = {n['time_ms'] / r['time_ms']:.2f}x")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=parse_shapes, default=None, help="B,H,D,T[;B,H,D,T...]")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: f32 on CPU, bf16 else")
    p.add_argument(
        "--skip-naive-bwd-above",
        type=int,
        default=None,
        metavar="T",
        help="do not run the token loop's forward+backward above this T (memory is still reported)",
    )
    p.add_argument("--variants", action="store_true", help="also time xla_fused, xla_two and auto")
    p.add_argument("--tune", action="store_true", help="sweep the chunked path's sizes instead")
    p.add_argument(
        "--precision",
        default=None,
        choices=sorted(PRECISIONS),
        help="matmul precision of the chunked path on this backend (default: utils.MATMUL_PRECISION)",
    )
    args = p.parse_args(argv)

    backend = jax.default_backend()
    if args.precision:
        utils.MATMUL_PRECISION[backend] = PRECISIONS[args.precision]
    dev = jax.devices()[0]
    dtype = jnp.dtype(args.dtype or ("float32" if backend == "cpu" else "bfloat16"))
    shapes = args.shapes or (CPU_SHAPES if backend == "cpu" else GPU_SHAPES)
    impls = ["naive", "xla"] + (["xla_fused", "xla_two", "auto"] if args.variants else [])
    info = dict(
        backend=backend,
        device=str(dev),
        device_kind=getattr(dev, "device_kind", "?"),
        jax=jax.__version__,
        machine=platform.machine(),
        dtype=dtype.name,
        precision=str(utils.matmul_precision()),
    )
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    print(HEADER)
    rows: list[dict] = []
    if args.tune:
        rows += tune(shapes[-1], dtype, args.repeats)
    else:
        for shape in shapes:
            rows += bench_shape(shape, dtype, args.repeats, impls, args.skip_naive_bwd_above)
    lines = summary(rows)
    for line in lines:
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(**info, rows=rows, summary=lines), f, indent=1)


if __name__ == "__main__":
    main()
