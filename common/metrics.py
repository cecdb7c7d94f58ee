"""Metrics sinks: ``metrics.jsonl`` always, TensorBoard and wandb when asked and installed.

Only rank 0 writes. ``metrics.jsonl`` is the ground truth (one JSON object per logging step,
flushed each time, so a killed run keeps its curve and a report can be drawn from it).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# One metric namespace for both stages (what metrics.jsonl, TensorBoard and wandb show):
#   train/<name>   losses, learning rate, gradient norms, train/nonfinite_skipped (steps the
#                  non-finite guard skipped in the logging window), train/samples_seen
#   data/skipped   corrupt or incomplete samples skipped in the window, all ranks together
#   perf/<name>    throughput (images, tokens or steps per second, data-wait fraction, MFU)
TRAIN, DATA, PERF = "train/", "data/", "perf/"


def train_key(name: str) -> str:
    """A stage's own loss or gradient-norm name in the shared namespace (``sit_loss`` -> ``train/sit_loss``)."""
    return TRAIN + name


class MetricsLogger:
    def __init__(
        self, run_dir: Path, report_to: list[str], project: str, run: str, config: dict, enabled: bool
    ) -> None:
        self.enabled = enabled
        self._file = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - lives with the run
        if "tensorboard" in report_to:
            self._tb = _open_tensorboard(run_dir / "tensorboard")
        if "wandb" in report_to:
            self._wandb = _open_wandb(project, run, config, run_dir)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def log_image(self, step: int, tag: str, path: Path) -> None:
        if not self.enabled:
            return
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(str(path))}, step=step)
        if self._tb is not None:
            import numpy as np
            from PIL import Image

            self._tb.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _open_tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboard is a declared dependency
        log.warning("tensorboard is not installed; metrics go to metrics.jsonl only")
        return None
    return SummaryWriter(str(folder))


def _open_wandb(project: str, run: str, config: dict, run_dir: Path):
    try:
        import wandb
    except ImportError:
        log.warning("trainer.report_to has 'wandb' but wandb is not installed (pip install wandb); skipping")
        return None
    return wandb.init(project=project, name=run, config=config, dir=str(run_dir), resume="allow")
