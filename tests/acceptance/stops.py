"""stops: SIGTERM, SIGINT and SIGHUP sent as a user or a scheduler sends them, with and without
loader workers, at one rank and under torchrun; and torchrun SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from .harness import (
    TIMEOUT,
    Case,
    Ctx,
    _proc_table,
    base_flags,
    case,
    ckpt_dirs,
    exit_statuses,
    judge,
    kill_everything,
    last_line,
    message_lines,
    success_problems,
    tagged,
)

STOP_LIMIT = 120  # s from the signal to the end of every trainer process
SYNC = 8  # log (and sync) steps: a stop needs more batches than the workers had prefetched at the signal


def _start(ctx: Ctx, nproc: int, workers: int) -> tuple[subprocess.Popen, Path, dict, Path]:
    run = ctx.dir / "run"
    flags = {
        **base_flags("vit", nproc),
        "--run.dir": str(run),
        "--max-steps": "100000",
        "--checkpoint.resume": "none",
        "--data.num-workers": str(workers),
        "--metrics.log-every": str(SYNC),
    }
    proc, log = ctx.start(flags, nproc=nproc, exit_dir=ctx.dir / "exits")
    return proc, log, flags, run


def _saved_and_resumable(ctx: Ctx, run: Path, flags: dict, out: str, nproc: int) -> tuple[list[str], int | None]:
    """Problems with the checkpoint the stop saved (announced, the newest, one shard per rank) and its
    resume (one rank, to the next step)."""
    dirs = ckpt_dirs(run)
    if not dirs:
        return ["no checkpoint saved"], None
    newest = dirs[-1]
    step = int(newest.name.split("-")[-1])
    problems = []
    if f": saved step {step}, exiting" not in message_lines(out):
        problems.append(f"step {step} saved without the stop saying so")
    if len(list(newest.glob("*.distcp"))) != nproc:
        problems.append(f"{newest.name} lacks a rank's shard")
    resume = {**base_flags("vit"), **{k: v for k, v in flags.items() if k in ("--run.dir", "--data.num-workers")}}
    again = ctx.run({**resume, "--max-steps": str(step + 1), "--checkpoint.resume": "auto"})
    problems += success_problems(again, "resume")
    if not again.rc and step + 1 not in {int(d.name.split("-")[-1]) for d in ckpt_dirs(run)}:
        problems.append(f"resume did not reach step {step + 1}")
    return problems, step


def stop_signal(ctx: Ctx, nproc: int, sig: str, workers: int, to: str) -> tuple[bool, str]:
    """A stop signal once training runs: to the process group of `python recipes/train.py` (Ctrl-C,
    a closed terminal, `kill -TERM -PGID`), to torchrun (a scheduler's SIGTERM) or to torchrun's process
    group (Ctrl-C, a closed terminal; torchrun sends it on to each worker's group). Handled well:
    every trainer process saves the same checkpoint (announced, one shard per rank) and exits 0
    within 120 s without a traceback, and a resume continues from it."""
    proc, log, flags, run = _start(ctx, nproc, workers)
    try:
        if not ctx.wait_for_step(proc, run, log, SYNC, TIMEOUT):
            return False, f"training never started ({proc.poll()}): {last_line(log.read_text())}"
        signum = getattr(signal, sig)
        if to == "group":
            os.killpg(proc.pid, signum)
        else:
            os.kill(proc.pid, signum)
        res = ctx.finish(proc, log, (time.monotonic() - proc._acc_start) + STOP_LIMIT)  # type: ignore[attr-defined]
    finally:
        kill_everything(proc)
    if res.timed_out:
        return False, f"did not stop within {STOP_LIMIT} s of {sig}"
    problems = []
    statuses = exit_statuses(ctx.dir / "exits")
    if statuses != {r: "0" for r in range(nproc)}:
        problems.append(f"trainer exit statuses {statuses or 'none'} (a rank missing: killed), launcher {res.brief()}")
    if res.traceback:
        problems.append("traceback")
    more, step = _saved_and_resumable(ctx, run, flags, res.out, nproc)
    problems += more
    launcher = f"; torchrun {res.brief()}" if nproc > 1 else ""
    return judge(problems, f"every rank saved step {step} and exited 0{launcher}; resumed")


def sigkill_torchrun(ctx: Ctx, nproc: int, workers: int) -> tuple[bool, str]:
    """torchrun SIGKILLed once training runs (it can forward nothing; its workers live in sessions of
    their own). Handled well: within 120 s no trainer process or loader worker is left running,
    each rank having saved the same checkpoint and exited 0, and a resume continues from it."""
    proc, log, flags, run = _start(ctx, nproc, workers)
    try:
        if not ctx.wait_for_step(proc, run, log, SYNC, TIMEOUT):
            return False, f"training never started ({proc.poll()}): {last_line(log.read_text())}"
        ranks = {pid for pid, parent in _proc_table().items() if parent == proc.pid}
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        end = time.monotonic() + STOP_LIMIT
        left = tagged(proc._acc_tag)  # type: ignore[attr-defined]
        while left and time.monotonic() < end:
            time.sleep(0.2)
            left = tagged(proc._acc_tag)  # type: ignore[attr-defined]
        out = log.read_text(errors="replace")
    finally:
        kill_everything(proc)
    if left:
        return False, f"{len(left)} of its processes ({len(ranks)} ranks, loader workers) ran {STOP_LIMIT} s on"
    problems = []
    statuses = exit_statuses(ctx.dir / "exits")
    if statuses != {r: "0" for r in range(nproc)}:
        problems.append(f"trainer exit statuses {statuses or 'none'} (a rank missing: killed)")
    more, step = _saved_and_resumable(ctx, run, flags, out, nproc)
    problems += more
    return judge(problems, f"every rank saved step {step}, exited 0 and left nothing running; resumed")


def cases(nproc: int) -> list[Case]:
    out = []
    for sig in ("SIGTERM", "SIGINT", "SIGHUP"):
        for workers in (0, 2):
            name = f"{sig.lower()}-{workers}workers"
            out.append(case(f"{name}-1rank-group", stop_signal, nproc=1, sig=sig, workers=workers, to="group"))
            to = "process" if sig == "SIGTERM" else "group"  # a scheduler signals torchrun; a terminal, its group
            out.append(
                case(f"{name}-{nproc}rank-torchrun-{to}", stop_signal, nproc=nproc, sig=sig, workers=workers, to=to)
            )
    out.append(case(f"sigkill-torchrun-2workers-{nproc}rank", sigkill_torchrun, slow=True, nproc=nproc, workers=2))
    return out
