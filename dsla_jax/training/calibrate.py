"""Output-scale calibration of freshly converted DSLA layers.

A DSLA layer copied from softmax attention sums q.k-weighted values over its (gated) history with no softmax
normalisation, so on SmolLM2-135M its first output is 50-1000x larger (RMS) than the attention output it replaces,
and a single fresh layer raises the next-token KL to the teacher by 5-38 nats. Multiplying its output gain by
RMS(attention output) / RMS(DSLA output), measured on the teacher's own activations over a few rows of training
text, brings that KL to ~0.1 nats before any training. `chain.calibrate` switches it on (the default).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dsla_jax.layers.dsla import DSLA
from dsla_jax.models.llama import Llama
from dsla_jax.training.data import TokenRows
from dsla_jax.training.layerwise import mixer_pair_sums, mixer_sumsq


def output_scales(
    teacher: Llama, mixers: dict[int, DSLA], rows: TokenRows, *, num_rows: int = 8, batch_size: int = 8
) -> dict[int, float]:
    """{layer: RMS(attention output) / RMS(mixer output)}, both fed the teacher's input to that layer (first
    `num_rows` rows)."""
    if len(rows) == 0:
        raise ValueError("no text rows to calibrate DSLA output scales on")

    def pair(lg, ls, mg, ms, x, info):
        return mixer_sumsq(lg, ls, None, None, x, info), mixer_sumsq(lg, ls, mg, ms, x, info)

    attn_ss, dsla_ss = mixer_pair_sums(teacher, mixers, rows, pair, num_rows=num_rows, batch_size=batch_size)
    return {i: float(np.sqrt(attn_ss[i] / max(dsla_ss[i], 1e-30))) for i in mixers}


def scale_output(layer: DSLA, scale: float) -> None:
    """Multiply the layer's output gain exp(log_scale) by `scale` (in place; o_proj keeps its weights).

    Scaling o_proj itself (as first done) left its weights at 0.1-2% of their size, and Adam's steps, which do
    not shrink with the weights, then moved them by several times their own size per step."""
    var = layer.log_scale
    value = var.get_value()
    var.set_value((value + jnp.log(jnp.asarray(scale, jnp.float32))).astype(value.dtype))


def calibrate(
    teacher: Llama, mixers: dict[int, DSLA], rows: TokenRows, *, num_rows: int = 8, batch_size: int = 8
) -> dict[int, float]:
    """Measure and apply the output scales of `mixers` (fresh DSLA layers keyed by layer); returns the scales."""
    scales = output_scales(teacher, mixers, rows, num_rows=num_rows, batch_size=batch_size)
    for i, s in scales.items():
        scale_output(mixers[i], s)
    return scales
