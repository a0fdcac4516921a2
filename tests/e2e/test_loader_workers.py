"""The loader workers' part in a stop: they ignore the stop signals and leave stopping to the
trainer, one killed is reported in one line, and closing the loader ends one that hangs.

Each test runs in a process of its own (the rank runner): killing a worker raises from torch's SIGCHLD
handler in the process that owns the loader, which must not be pytest's."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from rank_runner import run_ranks
from ucfvit.data.balance import plan_load
from ucfvit.data.loader import STOP_SIGNALS, build_loader, close_workers, dead_worker_error
from ucfvit.data.readers import DataError
from ucfvit.train.cli import _one_line


class WorkerSignals:
    """An endless source whose samples say how the worker that read them handles each stop signal
    (1: ignored)."""

    size = None

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        ignored = [signal.getsignal(sig) == signal.SIG_IGN for sig in STOP_SIGNALS]
        return {"image": torch.tensor(ignored, dtype=torch.int64), "pid": torch.tensor(os.getpid())}


def one_worker_loader(max_steps: int = 4):
    plan = plan_load(["signals"], [None], dp_size=1, local_batch=1)
    return build_loader([WorkerSignals()], plan, 0, [0], 0, max_steps, micro=1, seed=0, num_workers=1)


def loader_workers_ignore_the_stop_signals():
    """A stop signal sent to the process group (Ctrl-C, torchrun forwarding SIGTERM) reaches the
    workers too; they must leave the stop to the trainer, which still needs their batches."""
    batches = iter(one_worker_loader())
    first = next(batches)
    assert first["image"].tolist() == [[1, 1, 1]]
    os.kill(int(first["pid"]), signal.SIGTERM)
    assert next(batches)["pid"].item() == first["pid"].item()  # the same worker, alive


def _dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def a_killed_loader_worker_is_one_line_naming_memory_and_the_option():
    batches = iter(one_worker_loader(max_steps=1000))
    pid = int(next(batches)["pid"])
    # torch's SIGCHLD handler (here or in next()) or its wait for a batch raise a RuntimeError naming
    # the worker; a hand-over that the kill cut short, a ConnectionResetError.
    with pytest.raises((RuntimeError, ConnectionError)) as info:
        os.kill(pid, signal.SIGKILL)
        while not _dead(pid):
            time.sleep(0.01)
        next(batches)
    err = dead_worker_error(info.value, rank=1, num_workers=2)
    assert isinstance(err, DataError)
    line = _one_line(err)
    assert line.count("\n") == 0 and line.startswith(f"data error: rank 1: data loader worker (pid {pid})")
    assert "memory" in line and "--data.num-workers (now 2)" in line
    del batches
    assert dead_worker_error(RuntimeError("CUDA error: out of memory"), 0, 2) is None

    # Killed while handing over a batch, the worker breaks the hand-over first (before torch's SIGCHLD
    # handler runs, held back here): the live loader is asked which worker died.
    batches = iter(one_worker_loader(max_steps=1000))
    pid = int(next(batches)["pid"])
    torch_handler = signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the default keeps the zombie, unlike SIG_IGN
    try:
        os.kill(pid, signal.SIGKILL)
        while not _dead(pid):
            time.sleep(0.01)
        cut = dead_worker_error(ConnectionResetError(104, "Connection reset by peer"), rank=0, num_workers=1)
    finally:
        signal.signal(signal.SIGCHLD, torch_handler)
    assert str(cut).startswith(f"rank 0: data loader worker (pid {pid}) was killed by signal 'Killed'")
    del batches


class StuckAfterFirst(WorkerSignals):
    """A worker that hangs in its second sample (a hung file system)."""

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        if index > 0:
            time.sleep(3600)
        return super().sample(index)


def closing_the_loader_ends_a_stuck_worker_that_ignores_sigterm():
    """torch ends a worker that does not stop with SIGTERM (and multiprocessing, at exit, then waits
    for it forever): ignored now, so the trainer's close kills it."""
    torch.utils.data._utils.MP_STATUS_CHECK_INTERVAL = 0.2  # torch's join timeout (this process only)
    plan = plan_load(["stuck"], [None], dp_size=1, local_batch=1)
    batches = iter(build_loader([StuckAfterFirst()], plan, 0, [0], 0, 10, micro=1, seed=0, num_workers=1))
    pid = int(next(batches)["pid"])
    close_workers(batches, grace=5.0)
    assert _dead(pid)


def test_loader_workers_ignore_the_stop_signals():
    run_ranks(1, loader_workers_ignore_the_stop_signals, timeout=300)


def test_a_killed_loader_worker_is_one_line_naming_memory_and_the_option():
    run_ranks(1, a_killed_loader_worker_is_one_line_naming_memory_and_the_option, timeout=300)


def test_closing_the_loader_ends_a_stuck_worker_that_ignores_sigterm():
    run_ranks(1, closing_the_loader_ends_a_stuck_worker_that_ignores_sigterm, timeout=300)
