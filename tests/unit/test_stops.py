"""Stops: the trainer's stop flag (signals, a launcher that died) and the loader workers' part in it
(they ignore the stop signals; one killed is reported in one line). Trainer runs: tests/e2e/test_stops.py."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from ucfvit.data.balance import plan_load
from ucfvit.data.loader import STOP_SIGNALS, build_loader, close_workers, dead_worker_error
from ucfvit.data.readers import DataError
from ucfvit.train.cli import _one_line
from ucfvit.train.guards import StopFlag


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


def test_stop_flag_covers_sigterm_sigint_and_sighup_then_restores_the_handlers():
    assert set(STOP_SIGNALS) == {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    caught = []
    before = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in STOP_SIGNALS}
    try:
        for sig in STOP_SIGNALS:
            stop = StopFlag()
            assert not stop.requested
            os.kill(os.getpid(), sig)  # a closed terminal (SIGHUP) asks to save like SIGTERM does
            assert stop.requested, sig.name
            stop.restore()
        assert caught == []  # the flag had them all; the handlers before it are back now
        os.kill(os.getpid(), signal.SIGHUP)
        assert caught == [signal.SIGHUP]
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_stop_flag_under_torchrun_stops_once_the_launcher_is_gone(monkeypatch):
    """torchrun starts its workers in sessions of their own: SIGKILLed, it leaves them training unless
    they notice that their parent changed."""
    stop = StopFlag(watch_parent=True)
    try:
        assert not stop.requested and not stop.orphaned
        launcher = os.getppid()
        monkeypatch.setattr(os, "getppid", lambda: 1)  # reparented to init (or a subreaper)
        assert stop.orphaned and stop.requested and stop.parent == launcher
    finally:
        stop.restore()
    unwatched = StopFlag()
    unwatched.restore()
    assert not unwatched.requested  # a plain `python recipes/train.py` may outlive its shell (nohup)


def test_loader_workers_ignore_the_stop_signals():
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


def test_a_killed_loader_worker_is_one_line_naming_memory_and_the_option():
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


def test_closing_the_loader_ends_a_stuck_worker_that_ignores_sigterm(monkeypatch):
    """torch ends a worker that does not stop with SIGTERM (and multiprocessing, at exit, then waits
    for it forever): ignored now, so the trainer's close kills it."""
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.2)  # torch's join timeout
    plan = plan_load(["stuck"], [None], dp_size=1, local_batch=1)
    batches = iter(build_loader([StuckAfterFirst()], plan, 0, [0], 0, 10, micro=1, seed=0, num_workers=1))
    pid = int(next(batches)["pid"])
    close_workers(batches, grace=5.0)
    assert _dead(pid)
