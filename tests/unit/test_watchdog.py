"""The watchdog in this process: it stops with its block and notes on an exception where the run left
(rank, step and phase). A stalled loop and a SIGSTOPped rank of a torchrun job:
tests/e2e/test_watchdog.py."""

from __future__ import annotations

import time

import pytest

from ucfvit.train.watchdog import Watchdog


def test_the_watchdog_stops_with_the_block_and_notes_where_an_exception_left():
    with pytest.raises(RuntimeError) as info, Watchdog(0.5, rank=2) as watchdog:
        for step in range(1, 4):
            watchdog.progress(step, "training step")
            time.sleep(0.2)  # steps shorter than the timeout: no exit
        watchdog.progress(3, "checkpoint save")
        raise RuntimeError("collective failed")
    assert info.value.__notes__ == ["ucfvit: rank 2 failed at step 3 (checkpoint save)"]
    assert not watchdog._thread.is_alive()
    time.sleep(0.7)  # and the stopped watchdog no longer ends the process
