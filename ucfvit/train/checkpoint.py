"""Crash-safe distributed checkpoints that reshard across meshes.

Layout of ``<run.dir>/checkpoints``::

    step-00000100/      .metadata + shards (torch.distributed.checkpoint), trainer_state.json, config.json
    step-00000200/
    latest              name of the newest complete checkpoint (replaced atomically, last)

A checkpoint is written to ``step-N.tmp/`` and renamed only when every rank has finished, then
``latest`` moves and old checkpoints are pruned: a crash at any moment leaves the previous
checkpoint loadable. Model and optimizer tensors go through DCP (which reshards them onto any
mesh); the trainer state and config are JSON. DCP itself stores its ``.metadata`` (and any
non-tensor optimizer values) as pickles, which ``dcp.load`` unpickles: load only checkpoints you
trust. The data position is a global sample offset, valid on any mesh. Single-file safetensors
export lives in :mod:`ucfvit.train.export` (``export_safetensors``, ``load_exported``).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

__all__ = ["Checkpointer", "find_checkpoint", "is_complete", "read_checkpoint_config", "encode_rng", "decode_rng"]

_STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE, CONFIG_FILE, LATEST = "trainer_state.json", "config.json", "latest"


def is_complete(path: Path) -> bool:
    """A finished checkpoint: renamed from .tmp, with DCP metadata and the trainer state."""
    return _STEP_DIR.match(path.name) is not None and (path / ".metadata").is_file() and (path / STATE_FILE).is_file()


def _complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    return sorted((p for p in root.iterdir() if is_complete(p)), key=lambda p: int(p.name.split("-")[1]))


def find_checkpoint(run_or_ckpt: Path) -> Path | None:
    """The newest complete checkpoint under a run directory (or the checkpoint itself)."""
    path = Path(run_or_ckpt)
    if is_complete(path):
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not root.is_dir():
        return None
    latest = root / LATEST
    if latest.is_file():
        candidate = root / latest.read_text().strip()
        if is_complete(candidate):
            return candidate
    steps = _complete_checkpoints(root)
    return steps[-1] if steps else None


def read_checkpoint_config(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / CONFIG_FILE).read_text())


def encode_rng() -> dict[str, str]:
    """Host RNG states as JSON-safe strings (forward randomness is keyed by step, not by these)."""
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def decode_rng(state: dict[str, str]) -> None:
    raw = base64.b64decode(state["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpointer:
    """Saves and loads model + optimizer (DCP) and the trainer's JSON state in ``run_dir/checkpoints``."""

    def __init__(self, run_dir: Path, keep: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = max(1, keep)
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, config: dict) -> Path:
        """Collective: every rank must call it at the same step."""
        final = self.root / f"step-{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
            tmp.mkdir()
        self._barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        self._barrier()
        if self.rank == 0:
            _write_atomic(tmp / CONFIG_FILE, json.dumps(config, indent=2))
            _write_atomic(tmp / STATE_FILE, json.dumps(state))
            if final.exists():  # the same step saved again (e.g. resumed and stopped at once)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(self.root / LATEST, final.name)
            self._prune()
        self._barrier()
        return final

    def _prune(self) -> None:
        for old in _complete_checkpoints(self.root)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Load model and optimizer (resharded onto this run's mesh); return the trainer state."""
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(ckpt))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return json.loads((ckpt / STATE_FILE).read_text())
