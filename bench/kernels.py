"""Kernel benchmark: the project's DSLA Pallas and XLA paths beside flash-linear-attention and softmax attention.

    python -m bench.kernels [--out bench_kernels.json] [--shapes B1T2048,B1T8192,...] [--no-fla] [--fla-bwd]
    python -m bench.kernels --sweep      # tile/launch variants of the Pallas kernels at B1 T8192 (and decode)

On whatever accelerator JAX finds (CPU: tiny shapes in the Pallas interpreter, a smoke test only), with H=32 heads of
dim 128 in bfloat16 (the Llama-2-7B attention shape), it times, in one run:
  * forward and forward+backward of one DSLA layer: the Pallas kernels (`dsla_attention_pallas`), the XLA path
    (`dsla_attention(impl="xla")`), FLA's `chunk_gla` and `fused_recurrent_gla` called twice (one call per state, as
    the original DSLA does), causal softmax attention (cuDNN and XLA through `jax.nn.dot_product_attention`, torch
    SDPA);
  * one decode step at B=64: both float32 states read and written (TB/s = 2 states x (read + write) bytes / time).
Gates are GLA-style log-sigmoid / 16 unless a row says "g=-50" (every gate at -50: the exact intra-chunk path).
Every Pallas row also reports its relative error against the XLA path on the same inputs.

JAX times are medians over repetitions of the mean of 10 back-to-back calls (dispatch overlaps the GPU work);
torch times are `triton.testing.do_bench` medians. The table is printed last and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for torch in the same process

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.common import rel_err  # noqa: E402

SHAPES = [(1, 2048), (1, 8192), (1, 32768), (8, 2048), (4, 8192)]
H, D = 32, 128
ROWS: list[dict] = []
META: dict = {}
OUT_PATH = "bench_kernels.json"


def log(*a):
    print(*a, flush=True)


def time_jax(fn, *args, reps: int = 7, inner: int = 10) -> float:
    """Median over `reps` of the mean time (ms) of `inner` back-to-back calls, after a warm-up call."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / inner * 1e3)
    return statistics.median(ts)


def record(**row):
    ROWS.append(row)
    log("  ", json.dumps(row))
    with open(OUT_PATH, "w") as f:  # after every row: a run cut short keeps what it measured
        json.dump({"meta": META, "rows": ROWS}, f, indent=1)


def make_inputs(B, T, dtype=jnp.bfloat16, gates="logsig", seed=0, h=H, d=D):
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (B, T, h, d), dtype)
    k = (jax.random.normal(ks[1], (B, T, h, d)) * d**-0.5).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, h, d), dtype)
    if gates == "min":
        g1 = jnp.full((B, T, h, d), -50.0, dtype)
        g2 = g1
    else:
        g1 = (jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, h, d))) / 16).astype(dtype)
        g2 = (jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, T, h, d)) + 2.0) / 16).astype(dtype)
    mix = jnp.array([0.6, 0.4], jnp.float32)
    return q, k, v, g1, g2, mix


def _fwd_bwd(fn):
    """jit of value-and-grad of sum(o * ct) w.r.t. q, k, v, g1, g2 (the training step's attention part): returns
    (loss, grads). The loss value makes the step compute o, as training does: with `jax.grad` alone (this
    benchmark until v10) the loss is linear in o, so XLA drops every kernel that only feeds o (the Pallas
    forward's recurrent kernel, 0.48 ms at B1 T8192 on an H200), and forward + backward read low by that much."""

    def loss(q, k, v, g1, g2, mix, ct):
        return jnp.sum(fn(q, k, v, g1, g2, mix).astype(jnp.float32) * ct)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))


def pallas_fn(config=None, interpret=False, chunk=64):
    from dsla_jax.ops.dsla.pallas import dsla_attention_pallas

    def f(q, k, v, g1, g2, mix):
        return dsla_attention_pallas(q, k, v, g1, g2, mix, chunk_size=chunk, config=config, interpret=interpret)[0]

    return f


def xla_fn():
    from dsla_jax.ops.dsla import dsla_attention

    def f(q, k, v, g1, g2, mix):
        return dsla_attention(q, k, v, g1, g2, mix, impl="xla")[0]

    return f


def bench_jax_layer(name, fn, args, *, B, T, ref=None, bwd=True, extra=None):
    """Times forward (and forward+backward) of a JAX DSLA implementation; returns its forward output."""
    extra = extra or {}
    out = None
    try:
        f = jax.jit(fn)
        out = f(*args)
        err = rel_err(ref, out) if ref is not None else None
        record(impl=name, B=B, T=T, pass_="fwd", ms=time_jax(f, *args), err_vs_xla=err, **extra)
    except Exception as e:  # keep going: one failing variant must not end the run
        record(impl=name, B=B, T=T, pass_="fwd", error=f"{type(e).__name__}: {str(e)[:300]}", **extra)
        traceback.print_exc(limit=2)
        return None
    if bwd:
        try:
            ct = jax.random.normal(jax.random.key(1), out.shape, jnp.float32)
            g = _fwd_bwd(fn)
            record(impl=name, B=B, T=T, pass_="fwd+bwd", ms=time_jax(g, *args, ct), **extra)
        except Exception as e:
            record(impl=name, B=B, T=T, pass_="fwd+bwd", error=f"{type(e).__name__}: {str(e)[:300]}", **extra)
            traceback.print_exc(limit=2)
    return out


# ----------------------------------------------------------------------------------------------------------------
# torch references (FLA, SDPA)
# ----------------------------------------------------------------------------------------------------------------


def _torch_bench(name, fn, B, T, pass_="fwd"):
    import torch
    from triton.testing import do_bench

    try:
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        record(impl=name, B=B, T=T, pass_=pass_, ms=ms)
    except Exception as e:
        record(impl=name, B=B, T=T, pass_=pass_, error=f"{type(e).__name__}: {str(e)[:300]}")
    torch.cuda.empty_cache()


def _torch_shape(B, T, fla_ops, fla_bwd: bool):
    """FLA (two GLA calls = one DSLA layer) and torch SDPA at one shape."""
    import torch

    dev = "cuda"
    q, k, v = (torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    k = k * D**-0.5
    g1, g2 = (torch.nn.functional.logsigmoid(torch.randn(B, T, H, D, device=dev)).to(torch.bfloat16) / 16 for _ in "12")
    if fla_ops is not None:
        chunk_gla, fused_recurrent_gla = fla_ops
        with torch.no_grad():
            _torch_bench("fla chunk_gla x2", lambda: (chunk_gla(q, k, v, g1), chunk_gla(q, k, v, g2)), B, T)
            if T <= 8192:
                _torch_bench(
                    "fla fused_recurrent_gla x2",
                    lambda: (fused_recurrent_gla(q, k, v, g1), fused_recurrent_gla(q, k, v, g2)),
                    B,
                    T,
                )
        if fla_bwd:
            leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, g1, g2)]
            do = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16)

            def step():
                lq, lk, lv, lg1, lg2 = leaves
                o = chunk_gla(lq, lk, lv, lg1)[0] * 0.6 + chunk_gla(lq, lk, lv, lg2)[0] * 0.4
                o.backward(do)

            t0 = time.time()
            step()  # the backward kernels autotune on first use
            log(f"   FLA backward warm-up {time.time() - t0:.0f}s")
            _torch_bench("fla chunk_gla x2", step, B, T, "fwd+bwd")
    with torch.no_grad():
        qs, ks, vs = (x.transpose(1, 2) for x in (q, k, v))
        _torch_bench(
            "torch sdpa causal",
            lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True),
            B,
            T,
        )


def _torch_decode(fused_recurrent_gla, B=64):
    """One token through fused_recurrent_gla per state with float32 [B, H, D, D] states (FLA's decode)."""
    import torch

    dev = "cuda"
    x = [torch.randn(B, 1, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    gd = [torch.nn.functional.logsigmoid(torch.randn(B, 1, H, D, device=dev)).to(torch.bfloat16) / 16 for _ in "12"]
    h0 = [torch.randn(B, H, D, D, device=dev, dtype=torch.float32) for _ in "12"]
    state_bytes = 2 * 2 * B * H * D * D * 4

    def dec():
        for gi, hi in zip(gd, h0):
            fused_recurrent_gla(x[0], x[1], x[2], gi, initial_state=hi, output_final_state=True)

    name = "fla fused_recurrent_gla x2 decode"
    try:
        from triton.testing import do_bench

        with torch.no_grad():
            ms = do_bench(dec, warmup=25, rep=100, return_mode="median")
        record(impl=name, B=B, T=1, pass_="decode", ms=ms, TBps=state_bytes / ms / 1e9)
    except Exception as e:
        record(impl=name, B=B, T=1, pass_="decode", error=f"{type(e).__name__}: {str(e)[:300]}")


def torch_setup(fla: bool):
    """(torch usable on a CUDA device, FLA's (chunk_gla, fused_recurrent_gla) or None): what the torch rows need."""
    try:
        import torch
    except ImportError as e:
        log("torch not importable:", e)
        return False, None
    if not torch.cuda.is_available():
        return False, None
    fla_ops = None
    if fla:
        try:
            from fla.ops.gla import chunk_gla, fused_recurrent_gla

            fla_ops = (chunk_gla, fused_recurrent_gla)
        except Exception as e:
            log("FLA not importable:", type(e).__name__, e)
    return True, fla_ops


# ----------------------------------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------------------------------


def decode_rows(B=64, interpret=False, sweep=False):
    from dsla_jax.ops.dsla.pallas import dsla_decode_step_pallas

    ks = jax.random.split(jax.random.key(3), 7)
    q = jax.random.normal(ks[0], (B, H, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, H, D), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, H, D), jnp.bfloat16)
    g1 = (jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, H, D))) / 16).astype(jnp.bfloat16)
    g2 = (jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, H, D))) / 16).astype(jnp.bfloat16)
    s = (jax.random.normal(ks[5], (B, H, D, D)), jax.random.normal(ks[6], (B, H, D, D)))
    mix = jnp.array([0.6, 0.4], jnp.float32)
    state_bytes = 2 * 2 * B * H * D * D * 4  # two states, read + write
    ref = None
    try:
        from dsla_jax.ops.dsla import dsla_decode_step

        f = jax.jit(dsla_decode_step)
        ref = f(q, k, v, g1, g2, mix, s)
        ms = time_jax(f, q, k, v, g1, g2, mix, s)
        record(impl="xla decode", B=B, T=1, pass_="decode", ms=ms, TBps=state_bytes / ms / 1e9)
    except Exception as e:
        record(impl="xla decode", B=B, T=1, pass_="decode", error=f"{type(e).__name__}: {str(e)[:300]}")

    def time_variant(name, f):  # one Pallas variant: its state error against XLA, time and state TB/s
        try:
            out = f(q, k, v, g1, g2, mix, s)
            err = rel_err(ref[1][0], out[1][0]) if ref is not None else None
            ms = time_jax(f, q, k, v, g1, g2, mix, s)
            record(impl=name, B=B, T=1, pass_="decode", ms=ms, TBps=state_bytes / ms / 1e9, err_vs_xla=err)
        except Exception as e:
            record(impl=name, B=B, T=1, pass_="decode", error=f"{type(e).__name__}: {str(e)[:300]}")

    variants = [(None, 4)]
    if sweep:
        variants = [(32, 8), (64, 4), (64, 8), (64, 16), (128, 8), (128, 16)]
    from dsla_jax.ops.dsla.pallas_decode import decode_step

    for bv, nw in variants:
        if bv is None:
            f = jax.jit(lambda *a: dsla_decode_step_pallas(*a, interpret=interpret))
        else:
            f = jax.jit(
                lambda q, k, v, g1, g2, mix, s, bv=bv, nw=nw: decode_step(
                    q, k, v, g1, g2, mix, s[0], s[1], scale=D**-0.5, backend="gpu", block_v=bv, num_warps=nw
                )
            )
        time_variant("pallas decode" + ("" if bv is None else f" BV{bv} w{nw}"), f)
    # The same step as a Mosaic GPU kernel (TMA copies; `pallas_decode_mgpu`), GPU only.
    if interpret or jax.default_backend() != "gpu":
        return
    for bv in (None, 32, 128) if sweep else (None,):
        f = jax.jit(
            lambda q, k, v, g1, g2, mix, s, bv=bv: dsla_decode_step_pallas(
                q, k, v, g1, g2, mix, s, gpu_lowering="mosaic", block_v=bv
            )
        )
        time_variant("pallas decode mosaic" + ("" if bv is None else f" BV{bv}"), f)


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


QUICK_FWD = (
    "split C64 V64 w8",
    "split C64 V64 w8 iw4",
    "split C64 V64 w8 iw4 K32",
    "split C64 V64 w4 iw4 K32",
    "split C64 V64 w8 kd-bf16",
    "split default (auto: mosaic)",
    "split default rec-triton",
    "split default mosaic f32-store",
)
QUICK_BWD = (
    "bwd split C64 V32 w8",
    "bwd split C64 V32 w4 dot",
    "bwd split C64 V32 w4 intra-first",
    "bwd split C64 V32 w8 iw8",
    "bwd split C64 V32 w8 dvw8",
    "bwd split C64 V32 w8 save",
    "bwd split C64 V32 w8 K32",
    "bwd split C64 V32 w4 K32",
    "bwd split C64 V32 w8 sK32 rw4",
    "bwd split C64 V32 w8 sK32 sw4",
    "bwd split C64 V32 w8 all-tf32",
)


def sweep_variants():
    """Forward variants of the GPU kernels: (label, GpuConfig kwargs). Labels without "split" are the fused
    (v3/v4) kernel; "split ..." the v5 split forward (sN: stages of its recurrent and segment kernels, iwN: warps
    of its intra-chunk kernel, bf16-store: decayed q and k stored in bfloat16, kd-bf16: decayed k only)."""
    base = dict(fwd="fused", chunk=64, block_v=64, num_warps=8, num_stages=2, state_dot="tf32", intra_dot="tf32")
    out = [("C64 V64 w8", base)]
    for label, upd in [
        ("C64 V64 w4", dict(num_warps=4)),
        ("C32 V64 w4", dict(chunk=32, num_warps=4)),
        ("C32 V64 w8", dict(chunk=32)),
        ("C64 V32 w4", dict(block_v=32, num_warps=4)),
        ("C32 V32 w4", dict(chunk=32, block_v=32, num_warps=4)),
        ("C64 V64 w8 intra-bf16", dict(intra_dot="bf16")),
        ("C64 V64 w8 all-bf16", dict(intra_dot="bf16", state_dot="bf16")),
        ("C64 V64 w8 P2", dict(num_segments=2)),
        ("C64 V64 w8 s1", dict(num_stages=1)),
        ("C128 V64 w8", dict(chunk=128)),
    ]:
        out.append((label, {**base, **upd}))
    split = dict(
        fwd="split",
        chunk=64,
        block_v=64,
        rec_num_warps=8,
        rec_num_stages=1,
        intra_num_warps=8,
        block_k=64,
        intra_block_k=None,
        split_dtype="float32",
        state_dot="tf32",
        intra_dot="tf32",
        rec="triton",  # the labels below keep their meaning (v5-v8: Triton segment pass and recurrent kernel)
    )
    for label, upd in [
        ("split C64 V64 w8", {}),
        ("split C64 V64 w8 K32", dict(block_k=32)),
        ("split C64 V64 w8 cs-dot", dict(cumsum="tf32x3")),
        ("split C64 V64 w8 iw4 cs-dot", dict(intra_num_warps=4, cumsum="tf32x3")),
        ("split C64 V64 w8 K128", dict(block_k=128)),
        ("split C64 V64 w4", dict(rec_num_warps=4)),
        ("split C64 V128 w8", dict(block_v=128)),
        ("split C64 V64 w8 s2", dict(rec_num_stages=2)),  # may exceed shared memory (float32 64-token tiles)
        ("split C32 V64 w4 s2", dict(chunk=32, rec_num_warps=4, rec_num_stages=2)),
        ("split C32 V64 w8 s2", dict(chunk=32, rec_num_stages=2)),
        ("split C32 V64 w8 s3", dict(chunk=32, rec_num_stages=3)),
        ("split C32 V128 w8 s2", dict(chunk=32, block_v=128, rec_num_stages=2)),
        ("split C64 V64 w8 iw4", dict(intra_num_warps=4)),
        ("split C64 V64 w8 iw4 K32", dict(intra_num_warps=4, block_k=32)),
        ("split C64 V64 w8 P4", dict(num_segments=4)),
        ("split C64 V64 w8 P16", dict(num_segments=16)),
        ("split C64 V64 w8 bf16-store s2", dict(split_dtype="bfloat16", rec_num_stages=2)),
        ("split C64 V128 w8 bf16-store s2", dict(split_dtype="bfloat16", block_v=128, rec_num_stages=2)),
        ("split C64 V64 w8 kd-bf16", dict(split_dtype="kd-bfloat16")),
        ("split C64 V64 w8 kd-bf16 s2", dict(split_dtype="kd-bfloat16", rec_num_stages=2)),
        ("split C64 V64 w4 iw4 K32", dict(intra_num_warps=4, block_k=32, rec_num_warps=4)),
    ]:
        out.append((label, {**split, **upd}))
    # v9: the segment pass and recurrent kernel on Mosaic GPU (WGMMA, TMA), beside Triton's, on the defaults
    out.append(("split default (auto: mosaic)", {}))
    out.append(("split default rec-triton", dict(rec="triton")))
    out.append(("split default mosaic f32-store", dict(rec="mosaic")))
    # v8, measured slower (3.4 ms against 1.6 at B1 T8192 on an H200): the sequential kernel recomputes the decays
    for label, upd in [
        ("onepass C64 V64 w8 K32", dict(fwd="onepass")),
        ("onepass C64 V64 w8 K64", dict(fwd="onepass", onepass_block_k=64)),
    ]:
        out.append((label, {**split, "intra_num_warps": 4, "intra_block_k": 32, **upd}))
    return out


def split_parts(args, interpret: bool, cfg=None):
    """Times the split forward's three kernels separately (default config) with their HBM bytes and GB/s."""
    from dsla_jax.ops.dsla import pallas_gpu as kg

    cfg = cfg or kg.GpuConfig()
    q, k, v, g1, g2, mix = args
    B, T, Hh, K = q.shape
    V = v.shape[-1]
    BH, N = B * Hh, T // cfg.chunk
    nv = V // min(cfg.block_v, V)
    P = cfg.num_segments or kg.pick_segments(BH, N, nv)
    it = q.dtype.itemsize
    qs, ks = (jnp.dtype(d).itemsize for d in kg.SPLIT_DTYPES[cfg.split_dtype])
    tok = B * T * Hh * K  # elements of one [B, T, H, K] tensor
    intra = jax.jit(lambda *a: kg.fwd_intra_gpu(*a, scale=K**-0.5, cfg=cfg, interpret=interpret))
    qd, kd, ebl, oi, _ = intra(q, k, v, g1, g2, mix)
    seg = jax.jit(lambda kd, e, v: kg.seg_states_split_gpu(kd, e, v, P=P, count=P - 1, cfg=cfg, interpret=interpret))
    s_in = jnp.zeros((BH, P, 2, K, V), jnp.float32)
    rec = jax.jit(lambda *a: kg.fwd_rec_gpu(*a, cfg=cfg, P=P, interpret=interpret))
    # Bytes with every tensor read once (the value tiles of a head run side by side and share L2) and V = K.
    parts = [
        ("intra", intra, (q, k, v, g1, g2, mix), 5 * tok * it + 2 * tok * (qs + ks) + tok * 4),
        ("seg", seg, (kd, ebl, v), (P - 1) / P * (2 * tok * ks + tok * it)),
        ("rec", rec, (qd, kd, ebl, v, oi, s_in), 2 * tok * (qs + ks) + 2 * tok * it + tok * 4),
    ]
    if not interpret and jax.default_backend() == "gpu" and it == 2 and cfg.chunk == 64:
        from dsla_jax.ops.dsla import pallas_gpu_rec_mgpu as km

        split = jax.jit(km.split_kd)
        kd4 = kd if kd.shape[0] == 4 else split(kd)  # "kd-bf16x2": the intra kernel wrote the halves
        s_in_t = jnp.swapaxes(s_in, -1, -2)
        mosaic_bytes = 2 * tok * (qs + 4) + 2 * tok * it + tok * 4
        if kd.shape[0] == 2:
            parts.append(("kd hi/lo (XLA)", split, (kd,), 2 * tok * ks + 2 * tok * 2 * 2))
        seg_m = jax.jit(
            lambda *a: km.seg_states_mgpu(*a, P=P, count=P - 1, chunk=cfg.chunk, block_v=min(cfg.block_v, V))
        )
        parts.append(("seg mosaic", seg_m, (kd4, ebl, v), (P - 1) / P * (2 * tok * 4 + tok * it)))
        for label, rnd in (("rec mosaic", True), ("rec mosaic no-round", False)):
            rec_m = jax.jit(
                lambda *a, rnd=rnd: km.fwd_rec_mgpu(
                    *a, P=P, chunk=cfg.chunk, block_v=min(cfg.block_v, V), round_states=rnd
                )
            )
            parts.append((label, rec_m, (qd, kd4, ebl, v, oi, s_in_t), mosaic_bytes))
    time_parts("split part", "fwd", parts if P > 1 else [p for p in parts if p[0] != "seg"], B=B, T=T, P=P)


def time_parts(prefix: str, pass_: str, parts, *, B: int, T: int, P: int) -> None:
    """Times each (name, jitted fn, args, HBM bytes) of `parts` alone and records its time and TB/s (or its error)."""
    for name, f, args, nbytes in parts:
        try:
            ms = time_jax(f, *args)
            record(impl=f"{prefix} {name} P{P}", B=B, T=T, pass_=pass_, ms=ms, GB=nbytes / 1e9, TBps=nbytes / ms / 1e9)
        except Exception as e:
            record(impl=f"{prefix} {name}", B=B, T=T, pass_=pass_, error=f"{type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc(limit=2)


def bwd_variants():
    """Backward variants: "bwd split ..." the split backward (the default: per-chunk states, then every chunk in
    parallel), "bwd fused ..." the older dq / dkv kernels. C: bwd_chunk, V: the state tile of the dq / dk kernel,
    w: its warps, iw: warps of the intra-chunk dq / dk kernels, dvN: the dv kernel's value tile (dvw: its warps), rw:
    warps of the state passes; save: the forward stores the chunk states (`save_states`); intra-first /
    states-first: the dq / dk kernel's other orders (one kernel, no float32 intra-chunk terms; the default is
    "split"); dot: the gate gradient's reverse cumsum by a 0/1 matmul instead of a scan; state-tf32 / all-tf32:
    single-pass tf32 instead of 3-pass for the state matmuls / every matmul (the default: single-pass for the state
    matmuls only), 3xtf32: 3-pass everywhere; cs-dot: gate cumsums by a 0/1 matmul instead of a scan; sK32: 32-key
    tiles in the state passes, sw4: 4 warps there (rw4 also sets the forward's recurrent kernels)."""
    split = dict(
        chunk=64,
        block_v=64,
        bwd="split",
        bwd_chunk=64,
        grads_block_v=32,
        grads_num_warps=8,
        grads_cumsum="scan",
        bwd_state_dot="tf32",
        dv_block_v=64,
        dv_num_warps=4,
        dqk_intra_num_warps=4,
        states_block_k=None,
        states_num_warps=None,
        rec="triton",
    )  # fmt: skip  (rec: the forward part as in v6-v8, so the labels keep their meaning)
    fused = dict(chunk=64, block_v=64, bwd="fused", bwd_chunk=32, bwd_num_warps=8, bwd_state_dot=None, rec="triton")
    return [
        ("bwd default (auto)", {}),
        ("bwd split C64 V32 w8", split),
        ("bwd split C64 V32 w4", {**split, "grads_num_warps": 4}),
        ("bwd split C64 V32 w4 dot", {**split, "grads_num_warps": 4, "grads_cumsum": "dot"}),
        ("bwd split C64 V32 w8 dot", {**split, "grads_cumsum": "dot"}),
        ("bwd split C64 V32 w8 iw8", {**split, "dqk_intra_num_warps": 8}),
        ("bwd split C64 V32 w8 dv32", {**split, "dv_block_v": 32}),
        ("bwd split C64 V32 w8 dv128", {**split, "dv_block_v": 128}),
        ("bwd split C64 V32 w8 dvw8", {**split, "dv_num_warps": 8}),
        ("bwd split C64 V64 w8", {**split, "grads_block_v": 64}),
        ("bwd split C64 V16 w8", {**split, "grads_block_v": 16}),
        ("bwd split C32 V32 w8", {**split, "bwd_chunk": 32}),
        ("bwd split C64 V32 w8 s2", {**split, "grads_num_stages": 2}),
        ("bwd split C64 V32 w8 K32", {**split, "block_k": 32}),
        ("bwd split C64 V32 w4 K32", {**split, "block_k": 32, "grads_num_warps": 4}),
        ("bwd split C64 V32 w8 sK64", {**split, "states_block_k": 64}),
        ("bwd split C64 V32 w8 P16", {**split, "num_segments": 16}),
        ("bwd split C64 V32 w8 save", {**split, "save_states": True}),
        ("bwd split C64 V32 w8 rw4", {**split, "rec_num_warps": 4}),
        ("bwd split C64 V32 w8 sK32 rw4", {**split, "states_block_k": 32, "rec_num_warps": 4}),
        ("bwd split C64 V32 w8 sK32 sw4", {**split, "states_block_k": 32, "states_num_warps": 4}),
        ("bwd split C64 V32 w4 intra-first", {**split, "grads_order": "intra-first", "grads_num_warps": 4}),
        ("bwd split C64 V32 w4 states-first", {**split, "grads_order": "states-first", "grads_num_warps": 4}),
        ("bwd split C64 V32 w8 cs-dot", {**split, "cumsum": "tf32x3"}),
        ("bwd split C64 V32 w8 3xtf32", {**split, "bwd_state_dot": "tf32x3"}),
        ("bwd split C64 V32 w8 all-tf32", {**split, "bwd_dot": "tf32", "bwd_state_dot": "tf32"}),
        ("bwd fused C32 w8", fused),
    ]


def bwd_parts(args, interpret: bool, cfg=None):
    """Times the split backward's kernels separately (default config) with their HBM bytes and TB/s."""
    from dsla_jax.ops.dsla import pallas_gpu as kg
    from dsla_jax.ops.dsla import pallas_gpu_bwd as kb

    cfg = cfg or kg.GpuConfig()
    q, k, v, g1, g2, mix = args
    B, T, Hh, K = q.shape
    V = v.shape[-1]
    BH, N = B * Hh, T // cfg.bwd_chunk
    P = cfg.num_segments or kg.pick_segments(BH, T // cfg.chunk, V // min(cfg.block_v, V))
    it = q.dtype.itemsize
    tok = B * T * Hh * K  # elements of one [B, T, H, K] tensor
    st = 2 * BH * N * K * V * 4  # one pass's per-chunk states, float32
    s0 = jnp.zeros((BH, P, 2, K, V), jnp.float32)
    kw = dict(scale=K**-0.5, cfg=cfg, P=P, interpret=interpret)
    fwd_st = jax.jit(lambda *a: kb.chunk_states_gpu(*a, reverse=False, **kw))
    rev_st = jax.jit(lambda *a: kb.chunk_states_gpu(*a, None, reverse=True, **kw))
    hs, _ = fwd_st(mix, k, v, g1, g2, s0)
    dl, e, _, _ = rev_st(mix, q, v, g1, g2)
    grads = jax.jit(lambda *a: kb.bwd_grads_gpu(*a, **kw))
    a = kg.fwd_intra_gpu(q, k, v, g1, g2, mix, scale=K**-0.5, cfg=cfg, interpret=interpret)[-1]
    parts = [
        ("states", fwd_st, (mix, k, v, g1, g2, s0), 4 * tok * it + st),
        ("adjoints", rev_st, (mix, q, v, g1, g2), 4 * tok * it + st),
        # dq/dk: 6 inputs, 2 state sets, 4 outputs; dv: 5 inputs, 1 state set, 1 output
        ("dqk+dv", grads, (mix, q, k, v, v, g1, g2, hs, dl, e, s0, a), 11 * tok * it + 3 * st + 5 * tok * it),
    ]
    time_parts("bwd part", "bwd", parts, B=B, T=T, P=P)


def run_sweep(interpret: bool, budget_s: float, quick: bool = False, only: str | None = None):
    from dsla_jax.ops.dsla.pallas_gpu import GpuConfig

    t_start = time.time()
    B, T = (1, 8192) if not interpret else (1, 256)
    args = make_inputs(B, T, h=H if not interpret else 2)
    ref = None
    try:
        ref = jax.jit(xla_fn())(*args)
    except Exception as e:
        log("xla path unavailable:", e)
    log(f"== forward sweep B{B} T{T}")
    for label, kw in sweep_variants():
        if (quick and label not in QUICK_FWD) or only == "bwd":
            continue
        if time.time() - t_start > budget_s:
            log("   sweep budget spent, skipping", label)
            continue
        cfg = GpuConfig(**kw)
        bench_jax_layer("pallas " + label, pallas_fn(cfg, interpret, cfg.chunk), args, B=B, T=T, ref=ref, bwd=False)
    if only != "bwd":
        log(f"== split forward parts B{B} T{T} (default config)")
        split_parts(args, interpret)
    if only != "fwd":
        log(f"== split backward parts B{B} T{T} (default config)")
        bwd_parts(args, interpret)
    log(f"== backward sweep B{B} T{T}")
    for label, kw in bwd_variants():
        if (quick and label not in QUICK_BWD) or only == "fwd":
            continue
        if time.time() - t_start > budget_s:
            log("   sweep budget spent, skipping", label)
            continue
        cfg = GpuConfig(**kw)
        f = pallas_fn(cfg, interpret, cfg.chunk)
        try:
            ct = jax.random.normal(jax.random.key(1), (B, T, args[0].shape[2], D), jnp.float32)
            g = _fwd_bwd(f)
            if ref is not None:  # gradient check against the XLA path at this shape
                g_ref = _fwd_bwd(xla_fn())(*args, ct)[1]
                errs = [rel_err(a, b) for a, b in zip(g_ref, g(*args, ct)[1])]
            else:
                errs = None
            record(impl="pallas " + label, B=B, T=T, pass_="fwd+bwd", ms=time_jax(g, *args, ct), grad_err_vs_xla=errs)
        except Exception as e:
            record(impl="pallas " + label, B=B, T=T, pass_="fwd+bwd", error=f"{type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc(limit=2)
    if quick:  # the table times the exact path; here only the decode tiles remain
        if not interpret and only is None:
            decode_rows(sweep=True)
        return
    log("== gates at -50 (exact intra-chunk path)")
    args_min = make_inputs(B, T, gates="min", h=args[0].shape[2])
    ref_min = jax.jit(xla_fn())(*args_min) if ref is not None else None
    bench_jax_layer("pallas g=-50", pallas_fn(None, interpret), args_min, B=B, T=T, ref=ref_min, bwd=True)
    if not interpret:
        decode_rows(sweep=True)


# GpuConfig fields only the backward reads: a backward pick carries them into the config (block_k, rec_num_warps and
# num_segments also set the forward's kernels, so the forward pick keeps those).
BWD_KEY_PREFIXES = ("grads_", "dv_", "dqk_")
BWD_KEYS = ("bwd", "bwd_num_warps", "bwd_state_dot", "save_states", "states_block_k", "states_num_warps")


def config_from_sweep(path: str):
    """The fastest accurate forward variant of a sweep JSON, with the fastest backward variant's backward tiles."""
    from dsla_jax.ops.dsla.pallas_gpu import GpuConfig

    try:
        with open(path) as f:
            rows = json.load(f)["rows"]
    except (OSError, ValueError, KeyError) as e:
        log(f"no sweep results at {path} ({e}); default config")
        return None
    fwd = dict(sweep_variants())
    bwd = dict(bwd_variants())
    ok_f = [
        r
        for r in rows
        if r["pass_"] == "fwd" and "ms" in r and r["impl"][7:] in fwd and (r["err_vs_xla"] or 1) < 1.5e-3
    ]
    # Backward tiles only from variants at the default precision (the tf32 ones are timed, not trusted).
    ok_b = [
        r for r in rows if r["pass_"] == "fwd+bwd" and "ms" in r and r["impl"][7:] in bwd and "tf32" not in r["impl"]
    ]
    if not ok_f:
        return None
    kw = dict(fwd[min(ok_f, key=lambda r: r["ms"])["impl"][7:]])
    if ok_b:
        bk = bwd[min(ok_b, key=lambda r: r["ms"])["impl"][7:]]
        kw.update({k: v for k, v in bk.items() if k.startswith(BWD_KEY_PREFIXES) or k in BWD_KEYS})
        if bk.get("cumsum") and kw.get("cumsum") != bk["cumsum"]:  # one cumsum for both passes: the backward's wins
            kw["cumsum"] = bk["cumsum"]
        d = GpuConfig()  # the "default" variants name no fields
        kw.update(bwd_chunk=min(bk.get("bwd_chunk", d.bwd_chunk), kw.get("chunk", d.chunk)))
    cfg = GpuConfig(**{k: v for k, v in kw.items() if k != "num_segments"})
    log(f"config from sweep: {cfg}")
    return cfg


def run_table(shapes, interpret: bool, fla: bool, fla_bwd: bool, xla: bool, config=None, deadline=float("inf")):
    """Every row of the table, shape by shape: the JAX rows, then FLA's and torch's at the same shape (a run cut
    short keeps the baselines of the shapes it finished), then the decode rows."""
    use_torch, fla_ops = torch_setup(fla) if not interpret else (False, None)
    for B, T in shapes:
        log(f"== B{B} T{T}")
        args = make_inputs(B, T, h=H if not interpret else 2)
        ref = None
        xf = xla_fn()
        if xla:
            try:
                ref = jax.jit(xf)(*args)
            except Exception as e:
                log("xla path failed:", type(e).__name__, str(e)[:300])
        chunk = config.chunk if config is not None else 64
        bench_jax_layer("pallas", pallas_fn(config, interpret, chunk), args, B=B, T=T, ref=ref)
        if (B, T) == (1, 8192) or interpret:
            args_min = make_inputs(B, T, gates="min", h=args[0].shape[2])
            ref_min = jax.jit(xf)(*args_min) if ref is not None else None
            bench_jax_layer("pallas g=-50", pallas_fn(config, interpret, chunk), args_min, B=B, T=T, ref=ref_min)
            del args_min, ref_min
        if ref is not None:
            bench_jax_layer("xla (dsla_attention impl=xla)", xf, args, B=B, T=T, bwd=(B, T) == (1, 8192) or interpret)
        if not interpret:
            q, k, v = args[0], args[1], args[2]
            for impl in ("cudnn", "xla"):
                if impl == "xla" and B * T > 8192:
                    continue
                try:
                    f = jax.jit(
                        lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
                            q, k, v, is_causal=True, implementation=impl
                        )
                    )
                    record(impl=f"jax softmax attention ({impl})", B=B, T=T, pass_="fwd", ms=time_jax(f, q, k, v))
                except Exception as e:
                    record(impl=f"jax softmax attention ({impl})", B=B, T=T, pass_="fwd", error=str(e)[:200])
        del args, ref
        if use_torch:
            _torch_shape(B, T, fla_ops, fla_bwd and (B, T) == (1, 8192) and time.time() < deadline)
    decode_rows(B=64 if not interpret else 2, interpret=interpret)
    if fla_ops is not None:
        _torch_decode(fla_ops[1])


def print_table():
    log("\n| impl | B | T | pass | ms | TB/s | err vs xla |")
    log("| --- | --- | --- | --- | --- | --- | --- |")
    for r in ROWS:
        ms = f"{r['ms']:.3f}" if "ms" in r else "ERR " + r.get("error", "")[:60]
        tb = f"{r['TBps']:.2f}" if "TBps" in r else ""
        err = r.get("err_vs_xla")
        if err is None and r.get("grad_err_vs_xla"):
            err = max(r["grad_err_vs_xla"])
        err = f"{err:.1e}" if isinstance(err, float) else ""
        log(f"| {r['impl']} | {r['B']} | {r['T']} | {r['pass_']} | {ms} | {tb} | {err} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_kernels.json", help="JSON file of all rows")
    ap.add_argument("--shapes", default=None, help="comma list like B1T2048,B4T8192 (default: the five standard)")
    ap.add_argument("--sweep", action="store_true", help="time tile/launch variants instead of the table")
    ap.add_argument("--sweep-budget", type=float, default=330.0, help="seconds after which the sweep stops")
    ap.add_argument("--quick", action="store_true", help="sweep only the main variants")
    ap.add_argument("--only", choices=("fwd", "bwd"), default=None, help="sweep only forward or backward variants")
    ap.add_argument("--no-fla", action="store_true", help="skip flash-linear-attention")
    ap.add_argument("--fla-bwd", action="store_true", help="also time FLA forward+backward (autotunes for minutes)")
    ap.add_argument("--no-xla", action="store_true", help="skip the project's XLA path")
    ap.add_argument("--config-from", default=None, help="a --sweep JSON: use its fastest accurate variant")
    ap.add_argument("--budget", type=float, default=float("inf"), help="seconds after which FLA backward is skipped")
    a = ap.parse_args(argv)
    global OUT_PATH
    OUT_PATH = a.out
    backend = jax.default_backend()
    interpret = backend == "cpu"
    dev = jax.devices()[0]
    log(f"backend={backend} device={dev.device_kind} jax={jax.__version__} python={platform.python_version()}")
    if a.shapes:
        shapes = [tuple(int(x) for x in s.strip()[1:].split("T")) for s in a.shapes.split(",")]
    else:
        shapes = SHAPES if not interpret else [(1, 64)]
    t0 = time.time()
    META.update(
        device=dev.device_kind,
        backend=backend,
        jax=jax.__version__,
        command="python -m bench.kernels " + " ".join(sys.argv[1:] if argv is None else argv),
        heads=H,
        head_dim=D,
        dtype="bfloat16",
    )
    if a.sweep:
        run_sweep(interpret, a.sweep_budget, a.quick, a.only)
    else:
        config = config_from_sweep(a.config_from) if a.config_from else None
        if config is not None:
            META["config"] = repr(config)
        run_table(shapes, interpret, not a.no_fla, a.fla_bwd, not a.no_xla, config, t0 + a.budget)
    META["seconds"] = time.time() - t0
    with open(a.out, "w") as f:
        json.dump({"meta": META, "rows": ROWS}, f, indent=1)
    print_table()


if __name__ == "__main__":
    main()
