"""Guards of the training loop: stop requests from signals, and non-finite losses, gradients or weights.

Ranks agree on both at the loop's sync points (one all-reduce carries them), so every rank stops
at the same step, saves the same checkpoint or refuses to save a non-finite one.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ucfvit.data.loader import STOP_SIGNALS

__all__ = [
    "DIVERGED_HINT",
    "FiniteGuard",
    "StopFlag",
    "TrainingDiverged",
    "launched_by_torchrun",
    "parameters_finite",
]


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became non-finite (more often than ``--optim.skip-nonfinite``
    allows); raised on every rank at once, before anything non-finite is saved."""


class StopFlag:
    """Set by SIGTERM (SLURM preemption, torchrun), SIGINT (Ctrl-C) or SIGHUP (a closed terminal or a
    dropped ssh session), or when the launcher died; checked collectively at the loop's sync points.

    Made before the data loader starts its worker processes, which inherit the handler until they
    ignore these signals (:func:`ucfvit.data.loader.init_worker`), so a signal sent to the
    whole process group reaches the trainer and leaves the workers running until the save is done.

    Args:
        watch_parent: Also stop when this process's parent dies (its parent pid changes). Under
            torchrun the workers run in sessions of their own, so a SIGKILLed torchrun would leave
            them training; one ``getppid`` per check finds it.
    """

    def __init__(self, watch_parent: bool = False):
        self._requested = False
        self.parent = os.getppid() if watch_parent else None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum, frame) -> None:
        self._requested = True

    @property
    def requested(self) -> bool:
        return self._requested or self.orphaned

    @requested.setter
    def requested(self, value: bool) -> None:
        self._requested = value

    @property
    def orphaned(self) -> bool:
        """Whether the parent watched since the start has died."""
        return self.parent is not None and os.getppid() != self.parent

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def launched_by_torchrun() -> bool:
    """Whether this process is a worker of torchrun's elastic agent (which sets ``TORCHELASTIC_RUN_ID``)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


DIVERGED_HINT = "Lower --optim.lr, keep --optim.grad-clip on, or skip such steps with --optim.skip-nonfinite N"


class FiniteGuard:
    """Catches a non-finite loss or gradient norm. With ``allowed`` = 0 (default) the non-finite
    steps are counted on the device and the run stops at the next sync point (no extra host sync);
    with ``allowed`` > 0 every step is checked on the host (one small all-reduce) and a
    non-finite one is skipped (no optimizer update), at most ``allowed`` times."""

    def __init__(self, allowed: int, start_step: int, device: torch.device):
        self.allowed, self.skipped, self.synced = allowed, 0, start_step
        self.nonfinite = torch.zeros((), device=device)

    def update_ok(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, last_saved: Path | None) -> bool:
        """Whether to apply the optimizer update of ``step`` (1-based)."""
        bad = (~(torch.isfinite(loss) & torch.isfinite(grad_norm.to(loss.device)))).float()
        if self.allowed == 0:
            self.nonfinite += bad
            return True
        dist.all_reduce(bad)  # non-finite on any rank
        if bad.item() == 0:
            return True
        self.skipped += 1
        if self.skipped > self.allowed:
            raise TrainingDiverged(
                f"step {step}: {self.skipped} steps with a non-finite loss or gradient norm, more than "
                f"--optim.skip-nonfinite={self.allowed} allows; stopping without saving (the last checkpoint, "
                f"{last_saved or 'none'}, is kept). Lower --optim.lr or keep --optim.grad-clip on"
            )
        if dist.get_rank() == 0:
            print(
                f"step {step}: non-finite loss or gradient norm, update skipped ({self.skipped} of "
                f"--optim.skip-nonfinite={self.allowed})",
                flush=True,
            )
        return False

    def check_synced(self, step: int, nonfinite: float, last_saved: Path | None) -> None:
        """At a sync point: stop if any step since the previous one was non-finite (every rank agrees)."""
        if nonfinite > 0:
            when = f"at step {step}" if step == self.synced + 1 else f"between step {self.synced + 1} and step {step}"
            raise TrainingDiverged(
                f"the loss or gradient norm became non-finite {when}; "
                f"stopping without saving (the last checkpoint, {last_saved or 'none'}, is kept). {DIVERGED_HINT}"
            )
        self.synced = step


def parameters_finite(model: nn.Module) -> bool:
    """Whether every parameter shard on every rank is finite (collective)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    ok = torch.stack([torch.isfinite(t).all() for t in local]).all().float() if local else torch.ones(())
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())
