"""misc: wrong command lines and paths, incompatible resumes, preemption and a full disk."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .harness import (
    FLAG_TIMEOUT,
    TIMEOUT,
    Case,
    Ctx,
    HarnessError,
    base_flags,
    case,
    ckpt_steps,
    judge,
    kill_everything,
    last_line,
    message_lines,
    names_flag,
    newest_ckpt,
    payload,
    refusal_problems,
    refused_naming,
    success_problems,
)

SAYS_NO_SPACE = re.compile(
    r"space|too large|disk|quota|EFBIG|ENOSPC|errno|(could not|cannot|failed to|unable to) (write|save)", re.I
)
SIMPLE = (
    "resume-nonexistent",
    "resume-path-is-file",
    "resume-empty-dir",
    "resume-empty-string",
    "run-dir-is-file",
    "unknown-model",
    "unknown-flag",
    "mesh-vs-world",
    "mesh-garbage",
    "mesh-vs-nproc",
    "model-size-unknown",
    "max-steps-float",
    "config-nonexistent",
    "config-garbage",
    "config-pickle",
    "option-of-other-family",
)


def misc_simple(ctx: Ctx, what: str) -> tuple[bool, str]:
    """A plainly wrong command line. Handled well: clean refusal (non-zero exit, no traceback)
    naming the offending flag, value or path."""
    run = ctx.dir / "run"
    flags = {**base_flags(), "--run.dir": str(run)}
    if what == "resume-nonexistent":
        path = str(ctx.dir / "nonexistent" / "step-00000002")
        return refused_naming(ctx, {**flags, "--checkpoint.resume": path}, [path])
    if what == "resume-path-is-file":
        path = ctx.dir / "notes.txt"
        path.write_text("not a checkpoint\n")
        return refused_naming(ctx, {**flags, "--checkpoint.resume": str(path)}, [str(path)])
    if what == "resume-empty-dir":
        path = ctx.dir / "empty"
        path.mkdir()
        return refused_naming(ctx, {**flags, "--checkpoint.resume": str(path)}, [str(path)])
    if what == "resume-empty-string":
        return refused_naming(ctx, {**flags, "--checkpoint.resume": ""}, ["--checkpoint.resume"])
    if what == "run-dir-is-file":
        run.write_text("a file\n")
        return refused_naming(ctx, flags, [str(run)])
    if what == "unknown-model":
        return refused_naming(ctx, {**flags, "--model": "nosuchfamily"}, ["nosuchfamily"])
    if what == "unknown-flag":
        return refused_naming(ctx, {**flags, "--optim.lrr": "1"}, ["--optim.lrr"])
    if what == "mesh-vs-world":
        return refused_naming(ctx, {**flags, "--mesh": "1x2x1"}, ["--mesh"])
    if what == "mesh-garbage":
        return refused_naming(ctx, {**flags, "--mesh": "2by1"}, ["--mesh"])
    if what == "mesh-vs-nproc":
        n = ctx.m.nproc
        return refused_naming(ctx, {**base_flags("vit", n, "1x1x1"), "--run.dir": str(run)}, ["--mesh"], nproc=n)
    if what == "model-size-unknown":
        return refused_naming(ctx, {**flags, "--model-size": "colossal"}, ["colossal"])
    if what == "max-steps-float":
        return refused_naming(ctx, {**flags, "--max-steps": "2.5"}, ["--max-steps"])
    if what == "config-nonexistent":
        path = str(ctx.dir / "nope.json")
        return refused_naming(ctx, ["--config", path, "--run.dir", str(run)], [path])
    if what == "config-garbage":
        path = ctx.dir / "config.json"
        path.write_text("{not json")
        return refused_naming(ctx, ["--config", str(path), "--run.dir", str(run)], [str(path)])
    if what == "config-pickle":
        path, marker = ctx.dir / "config.json", ctx.dir / "MARKER"
        path.write_bytes(payload(marker))
        return refused_naming(ctx, ["--config", str(path), "--run.dir", str(run)], [str(path)], marker=marker)
    if what == "option-of-other-family":
        return refused_naming(ctx, {**flags, "--arch.mask-ratio": "0.5"}, ["--arch.mask-ratio"])
    raise HarnessError(f"unknown misc case {what}")


def read_only_run_dir(ctx: Ctx) -> tuple[bool, str]:
    """--run.dir under a directory nobody may write (chmod 555; immutable when we are root).
    Handled well: clean refusal naming the run dir (flag or path)."""
    ro = ctx.dir / "readonly"
    ro.mkdir()
    os.chmod(ro, 0o555)
    immutable = False
    try:
        probe = ro / "probe"
        try:
            probe.write_text("x")
            probe.unlink()
            writable = True
        except OSError:
            writable = False
        if writable and shutil.which("chattr"):
            immutable = subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode == 0
            try:
                probe.write_text("x")
                probe.unlink()
            except OSError:
                writable = False
        if writable:
            ro = Path("/sys/ucfvit-acceptance")  # not creatable even by root
        run = ro / "run"
        res = ctx.run({**base_flags(), "--run.dir": str(run)}, timeout=FLAG_TIMEOUT)
        problems = refusal_problems(res)
        said = message_lines(res.out, scrub=False)
        if not (str(run) in said or names_flag(said, "--run.dir")):
            problems.append("names neither --run.dir nor the path")
        return judge(problems, f"refused: {last_line(res.out)}")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(ctx.dir / "readonly")], capture_output=True)
        os.chmod(ctx.dir / "readonly", 0o755)


def resume_mismatch(ctx: Ctx, what: str) -> tuple[bool, str]:
    """Resume a checkpoint with an incompatible model. Handled well: clean refusal naming the
    differing option (both model names for a different family)."""
    run, flags, _ = ctx.copy_template("vit1")
    ck = newest_ckpt(run)
    if what == "depth-auto":
        return refused_naming(ctx, {**flags, "--arch.depth": "3", "--checkpoint.resume": "auto"}, ["depth"])
    return refused_naming(
        ctx, {**base_flags("mae"), "--run.dir": str(run), "--checkpoint.resume": str(ck)}, ["vit", "mae"]
    )


def sigterm(ctx: Ctx, nproc: int) -> tuple[bool, str]:
    """SIGTERM (preemption) to a running job (to torchrun for several ranks). Handled well: it
    ends within 60 s without a traceback, leaving a checkpoint that resume auto continues from."""
    run = ctx.dir / "run"
    flags = {**base_flags("vit", nproc), "--run.dir": str(run), "--max-steps": "100000", "--checkpoint.resume": "none"}
    proc, log = ctx.start(flags, nproc=nproc)
    try:
        if not ctx.wait_for_step(proc, run, log, 3, TIMEOUT):
            return False, f"training never started ({proc.poll()})"
        os.kill(proc.pid, signal.SIGTERM)
        res = ctx.finish(proc, log, (time.monotonic() - proc._acc_start) + 60)  # type: ignore[attr-defined]
    finally:
        kill_everything(proc)
    problems = []
    if res.timed_out:
        return False, "did not stop within 60 s of SIGTERM"
    if res.traceback:
        problems.append("traceback")
    steps = ckpt_steps(run)
    if not steps:
        problems.append("no checkpoint saved")
        return judge(problems, "")
    last = max(steps)
    again = ctx.run({**flags, "--max-steps": str(last + 2), "--checkpoint.resume": "auto"}, nproc=nproc)
    problems += success_problems(again, "resume")
    if not again.rc and last + 2 not in ckpt_steps(run):
        problems.append(f"resume did not reach step {last + 2}")
    return judge(problems, f"stopped ({res.brief()}) with step {last} saved; resumed")


def disk_full(ctx: Ctx) -> tuple[bool, str]:
    """Writes fail with EFBIG (RLIMIT_FSIZE 256 KiB, so the tensor shards do not fit) while
    saving. Handled well: clean non-zero exit naming the problem; afterwards (disk fine again)
    resume auto succeeds from the previous checkpoint."""
    run, flags, _ = ctx.copy_template("vit1")
    resume = {**flags, "--max-steps": "4", "--checkpoint.resume": "auto"}
    res = ctx.run(resume, fsize=256 << 10)
    problems = refusal_problems(res)
    if not SAYS_NO_SPACE.search(message_lines(res.out)):
        problems.append("does not name the write failure")
    again = ctx.run(resume)
    problems += success_problems(again, "resume afterwards")
    return judge(problems, f"failed cleanly: {last_line(res.out)}; resumed afterwards")


def cases(nproc: int) -> list[Case]:
    return [
        *(case(what, misc_simple, what=what) for what in SIMPLE),
        case("run-dir-under-read-only-dir", read_only_run_dir),
        case("resume-different-depth-auto", resume_mismatch, what="depth-auto"),
        case("resume-different-model-path", resume_mismatch, what="model-path"),
        case("sigterm-1rank", sigterm, nproc=1),
        case(f"sigterm-{nproc}rank", sigterm, nproc=nproc),
        case("disk-full-during-save", disk_full),
    ]
