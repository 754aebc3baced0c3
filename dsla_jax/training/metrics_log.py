"""The run's metrics: one JSON object per line in `<out_dir>/metrics.jsonl`, mirrored to TensorBoard if asked.

Events: "step" (loss and its terms, grad_norm, lr, lambda_factor, tokens_per_s, step_s, skipped), "eval"
(perplexities of the teacher / hybrids), "transfer" / "transfer_done" (attention transfer), "layer_done", "nan"
(a non-finite step), "summary".
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any


def _tensorboard_writer(directory: Path):
    """A SummaryWriter from tensorboardX or torch.utils.tensorboard, or None (with a warning) when neither exists."""
    for module in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            mod = __import__(module, fromlist=["SummaryWriter"])
            return mod.SummaryWriter(str(directory))
        except Exception:  # not installed, or its own dependencies missing
            continue
    warnings.warn(
        "log.tensorboard=true but neither tensorboardX nor torch.utils.tensorboard is installed; skipping", stacklevel=3
    )
    return None


class MetricsLog:
    """Append-only JSONL log (written by process 0 only)."""

    def __init__(self, path: str | Path, *, tensorboard: bool = False, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.writer = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                self.writer = _tensorboard_writer(self.path.parent / "tensorboard")

    def write(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None and event in ("step", "transfer"):
            step = int(fields.get("global_step", fields.get("step", 0)))
            prefix = "train" if event == "step" else event
            for k, v in fields.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("global_step", "step"):
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
