"""Trainer hooks (``train(cfg, hooks=[...])``) and the metric sinks built on them (``--metrics.sink``).

A hook sees the run without editing the trainer: logging elsewhere, early stopping, alerts. Every
method is called on every rank with the same values (the loss and validation metrics are already
reduced), so a decision taken in a hook is the same everywhere. ``on_step_end`` and
``on_eval_end`` may return True to stop the run: it stops at the next synchronisation point (at
most ``SYNC_EVERY`` steps later), saving a checkpoint first, as for SIGTERM.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2

__all__ = ["SINKS", "Hooks", "TensorBoardSink", "WandbSink", "check_sinks", "make_sinks"]


class Hooks:
    """Override the methods you need; each default does nothing."""

    def on_step_end(self, step: int, record: dict[str, Any]) -> bool | None:
        """After each logged step: ``record`` is the progress line of metrics.jsonl (loss, lr, images/s...)."""

    def on_eval_end(self, step: int, metrics: dict[str, Any]) -> bool | None:
        """After each validation (``--eval.every``): the task's metrics."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """After a checkpoint of ``step`` is complete on disk at ``path``."""

    def on_pictures(self, step: int, path: Path) -> None:
        """After the run's picture was written (rank 0 only: the file exists there)."""

    def close(self) -> None:
        """At the end of the run, also after an error."""


def _scalars(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a record, lists spread as ``name/i`` (per class, per channel)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or key in ("step", "max_steps", "time"):
            continue
        if isinstance(value, (int, float)):
            out[prefix + key] = float(value)
        elif isinstance(value, list):
            out.update({f"{prefix}{key}/{i}": float(v) for i, v in enumerate(value) if isinstance(v, (int, float))})
    return out


class TensorBoardSink(Hooks):
    """Scalars and pictures to TensorBoard event files in ``<run.dir>/tensorboard`` (rank 0)."""

    def __init__(self, run_dir: Path, writer: Any = None):
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self.writer = writer

    def on_step_end(self, step, record):
        for name, value in _scalars(record, "train/").items():
            self.writer.add_scalar(name, value, step)

    def on_eval_end(self, step, metrics):
        for name, value in _scalars(metrics, "eval/").items():
            self.writer.add_scalar(name, value, step)

    def on_pictures(self, step, path):
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        self.writer.add_image(f"pictures/{Path(path).stem}", image, step, dataformats="HWC")

    def close(self):
        self.writer.close()


class WandbSink(Hooks):
    """Scalars and pictures to Weights & Biases (rank 0), offline unless ``WANDB_MODE`` says otherwise;
    the files go to ``<run.dir>/wandb`` (``wandb sync`` uploads them later)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], wandb: Any = None):
        if wandb is None:
            import wandb
        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "ucfvit"),
            name=Path(run_dir).name,
            dir=str(run_dir),
            config=config,
            mode=os.environ.get("WANDB_MODE", "offline"),
        )

    def on_step_end(self, step, record):
        self.run.log(_scalars(record, "train/"), step=step)

    def on_eval_end(self, step, metrics):
        self.run.log(_scalars(metrics, "eval/"), step=step)

    def on_pictures(self, step, path):
        self.run.log({f"pictures/{Path(path).stem}": self.wandb.Image(str(path))}, step=step)

    def close(self):
        self.run.finish()


SINKS = {"tensorboard": ("tensorboard", "pip install tensorboard"), "wandb": ("wandb", "pip install wandb")}
"""``--metrics.sink`` name -> (the module it needs, how to install it)."""


def check_sinks(sinks: Sequence[str]) -> None:
    """ValueError naming the sink whose package is missing (before anything starts)."""
    for sink in sinks:
        module, install = SINKS[sink]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"--metrics.sink {sink} needs the {module} package: {install}, or drop the sink")


def make_sinks(sinks: Sequence[str], run_dir: Path, config: dict[str, Any]) -> list[Hooks]:
    """The sink hooks of ``--metrics.sink`` (call on rank 0 only)."""
    built = {"tensorboard": lambda: TensorBoardSink(run_dir), "wandb": lambda: WandbSink(run_dir, config)}
    return [built[s]() for s in sinks]
