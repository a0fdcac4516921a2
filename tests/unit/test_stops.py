"""Stops: the trainer's stop flag (signals, a launcher that died). The loader workers' part in it:
tests/e2e/test_loader_workers.py; trainer runs: tests/e2e/test_stops.py."""

from __future__ import annotations

import os
import signal

from ucfvit.data.loader import STOP_SIGNALS
from ucfvit.train.guards import StopFlag


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
