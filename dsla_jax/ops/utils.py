"""Shared helpers of the linear-attention ops: shape checks, padding, GQA reshapes, backend choices.

Shape letters used in docstrings: B batch, T time, H query heads, Hk key/value heads (H % Hk == 0), G = H // Hk
query heads per kv head, K key (and gate) dimension, V value dimension, N number of chunks, C chunk size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

# Every matmul of the ops runs at float32 accuracy (no plain TF32 or single bf16 pass), so that the chunked path
# matches the token loop to ~1e-6 on every backend. Per backend, read at trace time by `matmul_precision()`.
MATMUL_PRECISION: dict[str, object] = {"cpu": jax.lax.Precision.HIGHEST, "gpu": jax.lax.Precision.HIGHEST}


def matmul_precision():
    """The `precision` argument of the ops' matmuls on the current backend."""
    return MATMUL_PRECISION.get(jax.default_backend(), jax.lax.Precision.HIGHEST)


IMPLS = ("auto", "naive", "xla", "xla_fused", "xla_two", "pallas")


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """The attention scale: `scale` if given, else `head_dim ** -0.5`."""
    return float(head_dim) ** -0.5 if scale is None else float(scale)


def _shape_str(x: jax.Array) -> str:
    return "x".join(str(d) for d in x.shape) or "scalar"


def check_gla_shapes(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gates: Sequence[jax.Array],
    states: Sequence[jax.Array | None],
    *,
    decode: bool = False,
    gate_names: Sequence[str] = ("g",),
) -> tuple[int, int, int, int, int, int]:
    """Validate the shapes of a (multi-state) GLA call and return `(B, T, H, Hk, K, V)`.

    Sequence form (`decode=False`): q [B, T, H, K], k and every gate [B, T, Hk, K], v [B, T, Hk, V].
    Decode form (`decode=True`): the same without the T axis (T is returned as 1).
    Every state that is not None must be [B, Hk, K, V].
    """
    nd = 3 if decode else 4
    layout = "[B, H, K]" if decode else "[B, T, H, K]"
    for name, x in (("q", q), ("k", k), ("v", v), *zip(gate_names, gates)):
        if x.ndim != nd:
            raise ValueError(f"{name} must be {nd}-D {layout}-like, got shape {tuple(x.shape)}")
    if decode:
        B, H, K = q.shape
        T = 1
        Bk, Hk, Kk = k.shape
        lead_k = (Bk,)
        lead_q = (B,)
    else:
        B, T, H, K = q.shape
        Bk, Tk, Hk, Kk = k.shape
        lead_k = (Bk, Tk)
        lead_q = (B, T)
    if lead_k != lead_q or Kk != K:
        raise ValueError(
            f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} (batch/time and key dim must agree)"
        )
    if Hk < 1 or H % Hk != 0:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads Hk={Hk}")
    if tuple(v.shape[:-1]) != tuple(k.shape[:-1]):
        raise ValueError(f"v shape {tuple(v.shape)} must agree with k shape {tuple(k.shape)} except in the last dim")
    V = v.shape[-1]
    for name, gate in zip(gate_names, gates):
        if tuple(gate.shape) != tuple(k.shape):
            raise ValueError(f"{name} shape {tuple(gate.shape)} must equal k shape {tuple(k.shape)}")
    for i, s in enumerate(states):
        if s is None:
            continue
        if tuple(s.shape) != (B, Hk, K, V):
            raise ValueError(f"state {i} has shape {tuple(s.shape)}, expected [B, Hk, K, V] = {(B, Hk, K, V)}")
    return B, T, H, Hk, K, V


def check_mix(mix: jax.Array) -> None:
    """`mix` must hold two weights, shape [2]."""
    if jnp.shape(mix) != (2,):
        raise ValueError(f"mix must have shape [2], got {tuple(jnp.shape(mix))}")


def check_chunking(chunk_size: int, sub_chunk: int) -> int:
    """Validate `chunk_size` and return the sub-chunk size used: `sub_chunk`, or the largest divisor of the chunk
    that divides `sub_chunk` (so any chunk size works; powers of two are fastest)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if isinstance(sub_chunk, bool) or not isinstance(sub_chunk, int) or sub_chunk < 1:
        raise ValueError(f"sub_chunk must be a positive int, got {sub_chunk!r}")
    return math.gcd(chunk_size, sub_chunk)


def pad_time(x: jax.Array, t_pad: int) -> jax.Array:
    """Zero-pad axis 1 (time) of `x` [B, T, ...] to length `t_pad`."""
    extra = t_pad - x.shape[1]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, extra)
    return jnp.pad(x, widths)


def group_queries(q: jax.Array, num_kv_heads: int) -> jax.Array:
    """[..., H, K] -> [..., Hk, G, K]: query head h reads kv head h // G (the repeat_kv convention)."""
    *lead, H, K = q.shape
    return q.reshape(*lead, num_kv_heads, H // num_kv_heads, K)


def ungroup_queries(o: jax.Array) -> jax.Array:
    """[..., Hk, G, V] -> [..., H, V]; inverse of `group_queries`."""
    *lead, Hk, G, V = o.shape
    return o.reshape(*lead, Hk * G, V)


def backend() -> str:
    """The default JAX backend platform ('cpu', 'gpu', 'tpu')."""
    return jax.default_backend()


# What impl="auto" runs, per backend: (impl computing the values, impl whose VJP gives the gradients).
# Measured with `python -m bench.ops --variants` (DSLA, B=1, H=8, K=V=64, float32, 2-core CPU shared with other
# jobs): the token loop's forward beats the chunked forward at every length tried (T=512/2048/8192: 8/19/113 ms vs
# 18/74/289 ms), but its backward keeps two [K, V] states per token (4.3 GiB of temp memory at T=8192 vs 130 MiB
# chunked) and is 3-8x slower (T=8192: 8.9 s vs 1.1-1.2 s). So on CPU auto computes values with the token loop and
# gradients through the chunked path (`value_and_grad_from`): inference gets the fast loop, training the lean
# backward, without a hint from the caller. On GPU the chunked path wins both ways (H200, B=1, H=32, K=V=128, bf16,
# T=8192: forward 8 ms vs 150-200 ms; the token loop's backward would need 82 GiB).
AUTO_IMPL: dict[str, tuple[str, str]] = {"cpu": ("naive", "xla"), "gpu": ("xla", "xla"), "tpu": ("xla", "xla")}
# Ops that have Pallas kernels (DSLA) run forward and backward with them on the GPU: one H200, B=1, T=8192, H=32,
# D=128, bf16, GLA-style gates (docs/benchmarks.md, v6): forward 1.78 ms vs 6.41 ms for the chunked XLA path,
# forward+backward 9.91 ms vs 26.3 ms, gradients within the 2e-3 bar of the float32 token loop on the card. They are
# slower only where chunks' gates decay by more than e^-40 (every gate at the -50 clamp: 10.7 ms forward, 32.7 ms
# forward+backward). The TPU kernel has run only in the Pallas interpreter, so TPU stays on XLA.
AUTO_IMPL_WITH_PALLAS: dict[str, tuple[str, str]] = {**AUTO_IMPL, "gpu": ("pallas", "pallas")}


def auto_impls(*, has_pallas: bool = False) -> tuple[str, str]:
    """(forward impl, gradient impl) that impl="auto" uses on the current backend."""
    return (AUTO_IMPL_WITH_PALLAS if has_pallas else AUTO_IMPL).get(backend(), ("xla", "xla"))


def value_and_grad_from(value_fn, grad_fn):
    """A function computing `value_fn(*args)` whose VJP is the VJP of `grad_fn` (same math, other algorithm).

    Both take the same positional array arguments and return the same pytree. The backward pass recomputes
    `grad_fn`'s forward; residuals are the arguments alone. Forward-mode differentiation (jvp) is not supported.
    """

    @jax.custom_vjp
    def f(*args):
        return value_fn(*args)

    def f_fwd(*args):
        return value_fn(*args), args

    def f_bwd(args, cotangent):
        _, vjp = jax.vjp(grad_fn, *args)
        return vjp(cotangent)

    f.defvjp(f_fwd, f_bwd)
    return f


def pallas_not_implemented() -> None:
    raise NotImplementedError(
        "impl='pallas' has no kernel for this op (only DSLA has Pallas kernels: dsla_jax.ops.dsla); use impl='xla'"
    )


def check_impl(impl: str, allowed: Sequence[str] = IMPLS) -> None:
    if impl not in allowed:
        raise ValueError(f"impl must be one of {tuple(allowed)}, got {impl!r}")
