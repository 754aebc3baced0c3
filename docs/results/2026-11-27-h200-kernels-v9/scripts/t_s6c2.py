"""Session 6 call 2: the Mosaic GPU recurrent kernel against the Triton one (B1 T8192 / T32768 H32 D128 bf16)."""
import jax, jax.numpy as jnp
from bench import kernels as bk
from dsla_jax.ops.dsla.pallas_gpu import GpuConfig
args = bk.make_inputs(1, 8192)
bk.split_parts(args, False)
for r in bk.ROWS:
    print(f"| {r['impl']} | {r.get('ms', float('nan')):.4f} ms | {r.get('TBps', float('nan')):.2f} TB/s | {r.get('error', '')[:300]}", flush=True)
ref = jax.jit(bk.xla_fn())(*args)
for name, kw in [("triton rec", {}), ("mosaic rec", dict(rec="mosaic")), ("triton rec again", {}), ("mosaic rec again", dict(rec="mosaic"))]:
    try:
        cfg = GpuConfig(**kw)
        f = jax.jit(bk.pallas_fn(cfg, False, cfg.chunk))
        err = float(bk.rel_err(ref, f(*args)))
        print(f"| T8192 {name} | fwd | {bk.time_jax(f, *args):.3f} ms | err vs xla {err:.1e} |", flush=True)
    except Exception as e:
        print(f"| T8192 {name} | ERROR {type(e).__name__}: {str(e)[:600]}", flush=True)
ct = jax.random.normal(jax.random.key(1), (1, 8192, 32, 128), jnp.float32)
gref = jax.jit(bk._fwd_bwd(bk.xla_fn()))(*args, ct)
for name, kw in [("triton rec", {}), ("mosaic rec", dict(rec="mosaic"))]:
    try:
        cfg = GpuConfig(**kw)
        g = bk._fwd_bwd(bk.pallas_fn(cfg, False, cfg.chunk))
        out = g(*args, ct)
        err = max(float(bk.rel_err(a, b)) for a, b in zip(gref, out))
        print(f"| T8192 {name} | fwd+bwd | {bk.time_jax(g, *args, ct):.3f} ms | max grad err vs xla {err:.1e} |", flush=True)
    except Exception as e:
        print(f"| T8192 {name} fwd+bwd | ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
args = bk.make_inputs(1, 32768)
for name, kw in [("triton rec", {}), ("mosaic rec", dict(rec="mosaic"))]:
    try:
        cfg = GpuConfig(**kw)
        f = jax.jit(bk.pallas_fn(cfg, False, cfg.chunk))
        print(f"| T32768 {name} | fwd | {bk.time_jax(f, *args):.3f} ms |", flush=True)
    except Exception as e:
        print(f"| T32768 {name} | ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
bk.ROWS.clear()
bk.decode_rows(B=64, sweep=False)
for r in bk.ROWS:
    print(f"| {r['impl']} (Lane) | {r.get('ms', float('nan')):.4f} ms | {r.get('TBps', float('nan')):.2f} TB/s | {r.get('error', '')[:200]}", flush=True)
