"""recipes/train.py under torchrun, as a user starts it: start a job, wait for it (failing the test
at a timeout), and kill torchrun with all its workers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def torchrun(nproc: int, argv: list[str], log: Path, exit_dir: Path | None = None) -> subprocess.Popen:
    """Start ``torchrun ... recipes/train.py argv`` in a session of its own; with ``exit_dir`` each rank
    writes its exit status there (read with ``acceptance.harness.exit_statuses``)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    recorder = [] if exit_dir is None else [str(ROOT / "tests" / "record_exit.py")]
    cmd = [*launcher, *recorder, str(ROOT / "recipes" / "train.py"), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    if exit_dir is not None:
        exit_dir.mkdir(parents=True, exist_ok=True)
        env["UCFVIT_EXIT_DIR"] = str(exit_dir)
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (which torchrun starts in sessions of their own)."""
    workers = children(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    while any(_running(pid) for pid in workers):
        time.sleep(0.01)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait(proc: subprocess.Popen, log: Path, timeout: float = 400) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_all(proc)
        pytest.fail(f"timed out:\n{log.read_text()[-3000:]}")
    return log.read_text()


def children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry.name))
    return kids
