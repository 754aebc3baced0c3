"""Score every layer for conversion order (attention entropy and/or measured sensitivity) and compare the orders.

    python -m train.ordering --config configs/smollm2_demo.yaml [--method entropy|sensitivity|both] [key=value ...]

Scores are cached as `<ordering.cache_dir or out_dir>/ordering_<method>.json`; the comparison is printed and written
to `ordering_comparison.json` beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dsla_jax.checkpoints import CheckpointError
from dsla_jax.training import load_config
from dsla_jax.training.chain import stage_counts
from dsla_jax.training.config import DistillConfigError
from dsla_jax.training.data import DataError
from dsla_jax.training.ordering import METHODS, compare_orders, format_comparison, layer_order
from dsla_jax.training.setup import load_rows, load_teacher


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.ordering", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, help="YAML config (default: configs/smollm2_demo.yaml)")
    p.add_argument("--method", choices=[*METHODS, "both"], default="both")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args(argv)
    config = args.config or Path(__file__).resolve().parents[1] / "configs" / "smollm2_demo.yaml"
    try:
        cfg = load_config(config, args.overrides)
        teacher, tokenizer, fingerprint = load_teacher(cfg)
        train_rows, heldout_rows = load_rows(cfg, tokenizer)
        methods = METHODS if args.method == "both" else (args.method,)
        cache_dir = Path(cfg.ordering.cache_dir or cfg.out_dir)
        results = {
            m: layer_order(
                m,
                teacher,
                prompt_rows=train_rows,
                heldout_rows=heldout_rows,
                cfg=cfg.ordering,
                model_cfg=cfg.model,
                fingerprint=fingerprint["weights"],
                cache_dir=cache_dir,
                calibration_rows=cfg.chain.calibration_rows if cfg.chain.calibrate else 0,
                progress=cfg.log.progress,
            )
            for m in methods
        }
    except (DistillConfigError, DataError, CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    comparison = None
    if len(results) == 2:
        counts = stage_counts(cfg.chain.stages, teacher.config.num_hidden_layers)
        comparison = compare_orders(results["entropy"]["order"], results["sensitivity"]["order"], counts)
        (cache_dir / "ordering_comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    print(format_comparison(results, comparison))
    return 0


if __name__ == "__main__":
    sys.exit(main())
