"""Helpers shared by the benchmarks."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def rel_err(ref, out) -> float:
    """RMS of out - ref over RMS of ref (float64), or NaN when out holds a NaN / Inf."""
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    if not np.isfinite(out).all():
        return float("nan")
    return float(np.sqrt(np.mean((out - ref) ** 2)) / max(np.sqrt(np.mean(ref**2)), 1e-30))
