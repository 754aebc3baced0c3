"""Chained layer-by-layer distillation of a Llama into a DSLA hybrid.

    python -m train.distill --config configs/smollm2_demo.yaml [section.key=value ...] [--resume]

Every key is described in configs/base.yaml and docs/distill.md. Exit status 0: done; 75: stopped by
train.time_limit_s after writing a checkpoint (rerun with --resume); 1: an error, explained on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsla_jax.checkpoints import CheckpointError
from dsla_jax.training import NonFiniteLoss, RunError, load_config, run_distillation
from dsla_jax.training.checkpoint import CheckpointMismatch
from dsla_jax.training.config import DistillConfigError
from dsla_jax.training.data import DataError
from dsla_jax.training.sharding import MeshError

INCOMPLETE = 75  # stopped by train.time_limit_s after a checkpoint: rerun with --resume
USER_ERRORS = (DistillConfigError, DataError, MeshError, CheckpointError, CheckpointMismatch, RunError, NonFiniteLoss)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.distill", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, help="YAML config (default: configs/smollm2_demo.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = args.config or Path(__file__).resolve().parents[1] / "configs" / "smollm2_demo.yaml"
    try:
        cfg = load_config(config, args.overrides)
        summary = run_distillation(cfg, resume=args.resume)
    except USER_ERRORS as e:
        raise SystemExit(f"error: {e}") from None
    return 0 if summary["complete"] else INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())
