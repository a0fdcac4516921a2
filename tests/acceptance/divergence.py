"""divergence: non-finite losses, and whether a non-finite state reaches a checkpoint."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from .harness import (
    TIMEOUT,
    Case,
    Ctx,
    HarnessError,
    base_flags,
    case,
    ckpt_dirs,
    judge,
    last_line,
    message_lines,
)

SAYS_NONFINITE = re.compile(r"non-?finite|not finite|diverg|skip", re.I)

# Run in a separate process (this package never imports torch): for each checkpoint dir given,
# the number of non-finite floating tensors and floats in it (or why it could not be read).
FINITE_CHECK = r"""
import json, math, sys, warnings
warnings.filterwarnings("ignore")
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

def walk(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from walk(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from walk(v)
    else:
        yield obj

report = {}
for path in sys.argv[1:]:
    try:
        sd = {}
        _load_state_dict(sd, storage_reader=dcp.FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
        bad = 0
        for v in walk(sd):
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                bad += 1
            elif isinstance(v, float) and not math.isfinite(v):
                bad += 1
        report[path] = bad
    except Exception as err:
        report[path] = "unreadable: " + type(err).__name__
print(json.dumps(report))
"""


def diverge(ctx: Ctx, model: str, nproc: int, extra: dict[str, str]) -> tuple[bool, str]:
    """A learning rate that makes the loss non-finite, saving every step. Handled well: no
    traceback, a message about non-finite values / divergence (stop or skip), and no checkpoint
    under the run dir holds a non-finite tensor (loaded with DCP in a separate process)."""
    run = ctx.dir / "run"
    flags = {
        **base_flags(model, nproc),
        "--run.dir": str(run),
        "--max-steps": "6",
        "--checkpoint.every": "1",
        "--checkpoint.keep": "10",
        "--schedule.warmup-steps": "0",
        **extra,
    }
    res = ctx.run(flags, nproc=nproc)
    problems = []
    if res.timed_out:
        problems.append("timed out")
    if res.traceback:
        problems.append("traceback")
    if not SAYS_NONFINITE.search(message_lines(res.out)):
        problems.append("no message about non-finite loss/divergence")
    dirs = ckpt_dirs(run)
    bad, unreadable = [], []
    if dirs:
        proc = subprocess.run(
            [sys.executable, "-c", FINITE_CHECK, *map(str, dirs)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        try:
            report = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError) as err:
            raise HarnessError(f"finite check failed: {proc.stderr[-500:]}") from err
        bad = [Path(p).name for p, v in report.items() if isinstance(v, int) and v]
        unreadable = [Path(p).name for p, v in report.items() if isinstance(v, str)]
    if bad:
        problems.append(f"non-finite tensors saved in {bad}")
    note = f"; unreadable (not counted): {unreadable}" if unreadable else ""
    return judge(problems, f"{res.brief()}, {len(dirs)} checkpoint(s) all finite{note}: {last_line(res.out)}")


def cases(nproc: int) -> list[Case]:
    return [
        case("vit-lr1e6", diverge, model="vit", nproc=1, extra={"--optim.lr": "1e6"}),
        case("vit-lr1e4-noclip", diverge, model="vit", nproc=1, extra={"--optim.lr": "1e4", "--optim.grad-clip": "0"}),
        case("mae-lr1e6", diverge, model="mae", nproc=1, extra={"--optim.lr": "1e6"}),
        case(f"mae-lr1e6-{nproc}rank", diverge, model="mae", nproc=nproc, extra={"--optim.lr": "1e6"}),
    ]
