"""Chained layer-by-layer distillation of a Llama into a DSLA hybrid (DSLA-Serve's training side).

    config.py      typed config (YAML + key=value overrides)     data.py        text -> token rows, resumable batches
    ordering.py    which layers first (entropy / sensitivity)    layerwise.py   the teacher run one layer at a time
    calibrate.py   output scale of fresh DSLA layers             chain.py       chain plan, student, hybrids
    forward.py     layer-by-layer forward with capture           losses.py      CE, KL, hidden-state, gate terms
    params.py      flat parameter dicts, trainable filters       optim.py       AdamW + warmup/cosine, clipping
    sharding.py    mesh, partition rules, placement              step.py        the jitted train step
    checkpoint.py  Orbax run checkpoints, distilled output       evaluate.py    perplexity, summary table
    setup.py       teacher, rows, order, placed student          loop.py        the run
    metrics_log.py JSONL / TensorBoard metrics                   tiny.py        tiny model + corpus for tests
    transfer.py    attention transfer before the chain

Entry point: `python -m train.distill --config configs/smollm2_demo.yaml [key=value ...] [--resume]`.
"""

from dsla_jax.training.checkpoint import load_distilled
from dsla_jax.training.config import DistillConfig, DistillConfigError, load_config
from dsla_jax.training.loop import NonFiniteLoss, RunError, run_distillation

__all__ = [
    "DistillConfig",
    "DistillConfigError",
    "NonFiniteLoss",
    "RunError",
    "load_config",
    "load_distilled",
    "run_distillation",
]
