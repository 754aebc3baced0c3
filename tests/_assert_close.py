"""Closeness check of the op tests: RMS relative error plus a NaN/Inf check, and per-dtype tolerances."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# RMS relative error allowed for outputs in a dtype, compared with the float32 token loop run on the same
# (dtype-rounded) inputs. bfloat16/float16 outputs are rounded to 8/11 significant bits.
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}


def tol(dtype) -> float:
    """Tolerance of the table for `dtype`."""
    return TOLERANCE[jnp.dtype(dtype).name]


def rms_rel_error(ref, out) -> float:
    """sqrt(mean((out - ref)^2)) / sqrt(mean(ref^2)), computed in float64."""
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    num = np.sqrt(np.mean((out - ref) ** 2)) if ref.size else 0.0
    den = np.sqrt(np.mean(ref**2)) if ref.size else 0.0
    return float(num / max(den, 1e-30))


def assert_close(name: str, ref, out, rtol: float) -> None:
    """Assert `out` is finite, has `ref`'s shape and is within `rtol` RMS relative error of `ref`."""
    assert tuple(jnp.shape(out)) == tuple(jnp.shape(ref)), f"{name}: shape {jnp.shape(out)} != {jnp.shape(ref)}"
    out32 = np.asarray(jnp.asarray(out, jnp.float32))
    ref32 = np.asarray(jnp.asarray(ref, jnp.float32))
    assert np.isfinite(out32).all(), f"{name}: {np.size(out32) - np.isfinite(out32).sum()} NaN/Inf values"
    assert np.isfinite(ref32).all(), f"{name}: reference has NaN/Inf values"
    err = rms_rel_error(ref32, out32)
    assert err <= rtol, f"{name}: RMS relative error {err:.3e} > {rtol:.1e}"
