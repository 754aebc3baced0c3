"""Session 6 call 1: decode (XLA / Triton / Mosaic GPU) and the gates-at--50 forward regression."""
import jax, jax.numpy as jnp
from bench import kernels as bk
from dsla_jax.ops.dsla.pallas_gpu import GpuConfig
bk.decode_rows(B=64, sweep=True)
for r in bk.ROWS:
    print(f"| {r['impl']} | {r.get('ms', float('nan')):.4f} ms | {r.get('TBps', float('nan')):.2f} TB/s | err {r.get('err_vs_xla')} | {r.get('error', '')[:200]}", flush=True)
args = bk.make_inputs(1, 8192, gates="min")
ref = jax.jit(bk.xla_fn())(*args)
for name, kw in [("default (exact K32)", {}), ("exact K64", dict(exact_block_k=64)), ("exact K128", dict(exact_block_k=128)),
                 ("no fixup (inline)", dict(fwd_fixup=False)), ("intra K64", dict(intra_block_k=64)),
                 ("intra K64 no fixup", dict(intra_block_k=64, fwd_fixup=False))]:
    try:
        cfg = GpuConfig(**kw)
        f = jax.jit(bk.pallas_fn(cfg, False, cfg.chunk))
        err = float(bk.rel_err(ref, f(*args)))
        print(f"| g=-50 {name} | fwd | {bk.time_jax(f, *args, reps=3, inner=3):.3f} ms | err vs xla {err:.1e} |", flush=True)
    except Exception as e:
        print(f"| g=-50 {name} | ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
args = bk.make_inputs(1, 8192)
for name, kw in [("default logsig", {}), ("exact K64 logsig", dict(exact_block_k=64))]:
    cfg = GpuConfig(**kw)
    f = jax.jit(bk.pallas_fn(cfg, False, cfg.chunk))
    print(f"| {name} | fwd | {bk.time_jax(f, *args):.3f} ms |", flush=True)
