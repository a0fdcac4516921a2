"""A per-rank watchdog: a rank that stops making progress ends its process, naming the step.

A stopped peer (SIGSTOP, a hung node) or a stuck collective blocks the other ranks inside C code,
where no Python exception can reach them. The process group's own timeout covers collectives
(``make_mesh(timeout=...)``); this thread covers everything between two progress reports, the
collectives included, and says where the run was. The training loop calls
:meth:`Watchdog.progress` at each step and around checkpoint save/load; when no report comes
within ``timeout`` seconds, the thread writes the loop's stack and one line to stderr
and ends the process with :data:`EXIT_CODE`. Under torchrun a failed worker makes torchrun stop
the others (SIGTERM, then SIGKILL after its grace period), so the whole job ends.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback

__all__ = ["EXIT_CODE", "Watchdog"]

EXIT_CODE = 124  # as coreutils `timeout`: the process was ended for making no progress


class Watchdog:
    """Ends the process (``os._exit(EXIT_CODE)``) when :meth:`progress` is not called for ``timeout`` seconds.

    A context manager: the thread runs inside the ``with`` block, in phase ``"setup"`` until the
    first report, and stops when the block ends; an exception leaving the block is annotated with
    where the run was (:meth:`annotate`).

    Args:
        timeout: Seconds without progress before the process ends.
        rank: This process's rank, for the message (default: the launcher's ``RANK``, else 0).
        flag: The option that sets ``timeout``, named in the message.
    """

    def __init__(self, timeout: float, rank: int | None = None, *, flag: str = "--run.collective-timeout"):
        self.timeout, self.flag = timeout, flag
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        # (step, phase, monotonic time of the report): replaced as one tuple, so no lock is needed.
        self._last: tuple[int | None, str, float] = (None, "setup", time.monotonic())
        self._watched: int | None = None  # the thread that entered the block: the training loop
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ucfvit-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self._watched = threading.get_ident()
        self.progress(None, "setup")
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.annotate(exc)
        self._stopped.set()
        self._thread.join()

    def progress(self, step: int | None, phase: str) -> None:
        """Report progress: the run is now at ``step`` (None: before the first step), doing ``phase``."""
        self._last = (step, phase, time.monotonic())

    def where(self) -> str:
        """Where the run was at the last report, e.g. ``"at step 7 (training step)"``."""
        step, phase, _ = self._last
        return f"during {phase}" if step is None else f"at step {step} ({phase})"

    def annotate(self, err: BaseException) -> None:
        """Add to an exception escaping the training loop where it happened (Python >= 3.11 shows it)."""
        if hasattr(err, "add_note"):
            err.add_note(f"ucfvit: rank {self.rank} failed {self.where()}")

    def _watch(self) -> None:
        while True:
            waited = time.monotonic() - self._last[2]
            if waited >= self.timeout:
                self._expire(waited)
            if self._stopped.wait(self.timeout - waited):
                return

    def _expire(self, waited: float) -> None:
        message = (
            f"ucfvit: rank {self.rank} made no progress for {waited:.0f} s {self.where()}; a rank is stopped or a "
            f"collective is stuck; exiting so torchrun tears down the job ({self.flag}={self.timeout:g})\n"
        )
        frame = sys._current_frames().get(self._watched)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else ""
        # os.write, not print: no lock the blocked loop might hold. os._exit, not sys.exit: the
        # loop is blocked in C code and would never see an exception.
        os.write(2, f"ucfvit: rank {self.rank}: the training loop is waiting here:\n{stack}{message}".encode())
        os._exit(EXIT_CODE)
