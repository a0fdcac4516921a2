"""Stops as a user causes them, with loader workers: a signal to the process group (Ctrl-C, a closed
terminal) of `python recipes/train.py`, SIGTERM or Ctrl-C to torchrun, torchrun SIGKILLed. Each rank
saves the same checkpoint and exits 0, and a resume continues from it; a killed loader worker ends the
run with one line. The stop flag and the workers' signals alone: tests/unit/test_stops.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from acceptance.harness import exit_statuses, has_traceback
from torchrun_jobs import children, kill_all, torchrun, wait
from ucfvit.train.checkpoint import find_checkpoint

ROOT = Path(__file__).parents[2]
TRAIN = ROOT / "recipes" / "train.py"
LIMIT = 120  # s from the signal to the end of every rank


def flags(run_dir: Path, nproc: int = 1) -> list[str]:
    """A tiny endless run with two loader workers per rank. Ranks sync every 8 steps (log steps), so
    a stop needs more batches than the workers had prefetched when the signal came."""
    mesh = ["--mesh", f"1x{nproc}x1"] if nproc > 1 else []
    return [
        *["--model", "vit", "--arch.img-size", "16", "16", "--data.global-batch-size", "4", *mesh],
        *["--max-steps", "100000", "--metrics.log-every", "8", "--data.num-workers", "2", "--run.dir", str(run_dir)],
    ]


def python_run(argv: list[str], log: Path) -> subprocess.Popen:
    """`python recipes/train.py argv` as a shell starts it: a process group of its own (with its workers)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(TRAIN), *argv]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_for_steps(proc: subprocess.Popen, run_dir: Path, steps: int = 1) -> None:
    """Until ``steps`` log lines are written (step 8 for one)."""
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    kill_all(proc)
    pytest.fail(f"the run never logged {steps} steps ({proc.poll()})")


def saved_step(text: str, run_dir: Path, nproc: int) -> int:
    """The step of the checkpoint the stop saved: announced, written by every rank, the newest."""
    ckpt = find_checkpoint(run_dir)
    assert ckpt is not None, text[-3000:]
    step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert f": saved step {step}, exiting" in text, text[-3000:]
    assert len(list(ckpt.glob("*.distcp"))) == nproc  # every rank wrote its shard of the same step
    assert not has_traceback(text), text[-3000:]  # torchrun's own (its SignalException) aside
    return step


def resumes(run_dir: Path, step: int, tmp_path: Path) -> None:
    """The checkpoint loads and training continues from it (one rank: it reshards onto any mesh)."""
    log = tmp_path / "resume.txt"
    argv = [*flags(run_dir), "--max-steps", str(step + 1), "--checkpoint.resume", "auto"]
    proc = python_run(argv, log)
    text = wait(proc, log, timeout=300)
    assert proc.returncode == 0 and f"resumed from {run_dir / 'checkpoints'}" in text, text[-3000:]
    assert find_checkpoint(run_dir).name == f"step-{step + 1:08d}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stop_signal_to_the_process_group_saves_and_exits_0(tmp_path, sig):
    """Ctrl-C (SIGINT), `kill -TERM -PGID` or a closed terminal (SIGHUP) reach the loader workers too."""
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    proc = python_run(flags(run_dir), log)
    wait_for_steps(proc, run_dir)
    os.killpg(proc.pid, sig)
    text = wait(proc, log, timeout=LIMIT)
    assert proc.returncode == 0, text[-3000:]
    resumes(run_dir, saved_step(text, run_dir, 1), tmp_path)


@pytest.mark.parametrize("to", ["torchrun", "group"])
def test_a_stop_of_torchrun_makes_every_rank_save_and_exit_0(tmp_path, to):
    """SIGTERM to torchrun (a scheduler's preemption) or SIGINT to its process group (Ctrl-C: its workers
    live in sessions of their own); torchrun sends the signal on to each worker's process group. torchrun
    itself then exits 1 with its SignalException: its own code, whatever the workers did."""
    run_dir, log, exits = tmp_path / "run", tmp_path / "log.txt", tmp_path / "exits"
    proc = torchrun(2, flags(run_dir, 2), log, exit_dir=exits)
    wait_for_steps(proc, run_dir)
    if to == "torchrun":
        os.kill(proc.pid, signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    text = wait(proc, log, timeout=LIMIT)
    assert exit_statuses(exits) == {0: "0", 1: "0"}, text[-3000:]
    assert proc.returncode == 1 and "SignalException" in text, text[-3000:]
    resumes(run_dir, saved_step(text, run_dir, 2), tmp_path)


def test_the_workers_of_a_sigkilled_torchrun_save_and_exit_0(tmp_path):
    """torchrun SIGKILLed (by a scheduler, an OOM kill) cannot forward anything: its workers, in
    sessions of their own, notice their parent is gone and stop at the next sync point."""
    run_dir, log, exits = tmp_path / "run", tmp_path / "log.txt", tmp_path / "exits"
    proc = torchrun(2, flags(run_dir, 2), log, exit_dir=exits)
    wait_for_steps(proc, run_dir)
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + LIMIT
    while len(exit_statuses(exits)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # the ranks' last lines
    text = log.read_text()
    for pid in workers:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
    assert exit_statuses(exits) == {0: "0", 1: "0"}, text[-3000:]
    assert f"stop requested (its launcher, pid {proc.pid}, is gone)" in text
    resumes(run_dir, saved_step(text, run_dir, 2), tmp_path)


def test_a_killed_loader_worker_ends_the_run_with_one_line(tmp_path):
    """As the out-of-memory killer would: SIGKILL to a loader worker of a running trainer."""
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    proc = python_run(flags(run_dir), log)
    wait_for_steps(proc, run_dir)
    loader_workers = children(proc.pid)
    assert len(loader_workers) == 2, loader_workers
    os.kill(loader_workers[0], signal.SIGKILL)
    text = wait(proc, log, timeout=LIMIT)
    assert proc.returncode == 1 and not has_traceback(text), text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith(f"recipes/train.py: data error: rank 0: data loader worker (pid {loader_workers[0]})"), last
    assert "memory" in last and "--data.num-workers (now 2)" in last
