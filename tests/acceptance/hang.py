"""hang: a stopped or killed rank in a multi-rank job."""

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
    HarnessError,
    base_flags,
    case,
    descendants,
    kill_everything,
    last_line,
    tagged,
)

HANG_LIMIT = 120  # a job with a stopped rank must end within this (s)


def environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item)


def workers(proc: subprocess.Popen, tag: str) -> dict[int, int]:
    """LOCAL_RANK -> pid of the trainer processes of a torchrun job."""
    found = {}
    for pid in descendants(proc.pid) | tagged(tag):
        env = environ_of(pid)
        if "LOCAL_RANK" in env and pid != proc.pid:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"train.py" in cmdline and b"torch.distributed.run" not in cmdline:
                found[int(env["LOCAL_RANK"])] = pid
    return found


def hang(ctx: Ctx, model: str, mesh: str, rank: str, sig: str) -> tuple[bool, str]:
    """Multi-rank training; one worker gets SIGSTOP (a hung rank) or SIGKILL (a crashed one) once
    training runs. Handled well: the whole job ends with a non-zero exit within 120 s."""
    n = ctx.m.nproc
    run = ctx.dir / "run"
    flags = {
        **base_flags(model, n, mesh.replace("N", str(n))),
        "--run.dir": str(run),
        "--max-steps": "100000",
        "--checkpoint.resume": "none",
    }
    if "--run.collective-timeout" in ctx.m.help_flags:
        flags["--run.collective-timeout"] = "10"
    proc, log = ctx.start(flags, nproc=n)
    try:
        if not ctx.wait_for_step(proc, run, log, 2, TIMEOUT):
            return False, f"training never started ({proc.poll()}): {last_line(log.read_text())}"
        ranks = workers(proc, proc._acc_tag)  # type: ignore[attr-defined]
        target = ranks.get(n - 1 if rank == "last" else 0)
        if target is None:
            raise HarnessError(f"worker not found among {ranks}")
        os.kill(target, getattr(signal, sig))
        t0 = time.monotonic()
        try:
            rc = proc.wait(timeout=HANG_LIMIT)
        except subprocess.TimeoutExpired:
            return False, f"still running {HANG_LIMIT} s after {sig} of rank {rank}"
        took = time.monotonic() - t0
        if rc == 0:
            return False, f"exit 0 after {sig} of a rank ({took:.0f} s)"
        return True, f"ended with exit {rc} {took:.0f} s after {sig}"
    finally:
        kill_everything(proc)


def cases(nproc: int) -> list[Case]:
    out = []
    for name, model, mesh, rank, sig in (
        ("sigstop-last-rank-fsdp", "mae", "1xNx1", "last", "SIGSTOP"),
        ("sigstop-rank0-fsdp", "mae", "1xNx1", "first", "SIGSTOP"),
        ("sigstop-last-rank-ddp", "vit", "Nx1x1", "last", "SIGSTOP"),
        ("sigkill-last-rank-fsdp", "mae", "1xNx1", "last", "SIGKILL"),
    ):
        out.append(case(name, hang, slow=True, model=model, mesh=mesh, rank=rank, sig=sig))
    return out
