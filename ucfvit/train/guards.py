"""Guards of the training loop: stop requests from signals, and non-finite losses, gradients or weights.

Ranks agree on both at the loop's sync points (one all-reduce carries them), so every rank stops
at the same step, saves the same checkpoint or refuses to save a non-finite one.
"""

from __future__ import annotations

import signal
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DIVERGED_HINT", "FiniteGuard", "StopFlag", "TrainingDiverged", "parameters_finite"]


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became non-finite (more often than ``--optim.skip-nonfinite``
    allows); raised on every rank at once, before anything non-finite is saved."""


class StopFlag:
    """Set by SIGTERM (SLURM preemption) or SIGINT (Ctrl-C); checked collectively."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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
