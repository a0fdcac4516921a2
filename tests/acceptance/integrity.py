"""integrity: damaged, missing or foreign checkpoint files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .harness import (
    PROBLEM,
    Case,
    Ctx,
    HarnessError,
    case,
    ckpt_steps,
    judge,
    last_line,
    message_lines,
    newest_ckpt,
    refusal_problems,
    resume_flags,
    shard,
    tree_digest,
)


def _named_json(ck: Path, word: str, default: str) -> Path:
    hits = sorted(p for p in ck.glob(f"*{word}*.json"))
    return hits[0] if hits else ck / default


def damage(ctx: Ctx, nproc: int, how: str, resume: str) -> tuple[bool, str]:
    """Damage the newest checkpoint and resume. Handled well: refuses (non-zero exit, no
    traceback) naming the damaged file or the problem (corrupt, checksum, missing, ...)."""
    run, flags, n = ctx.copy_template("vit1" if nproc == 1 else "mae2")
    ck = newest_ckpt(run)
    if how == "flip-shard-middle":
        target = shard(ck, last=nproc > 1)
        data = bytearray(target.read_bytes())
        mid = len(data) // 2
        data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
        target.write_bytes(bytes(data))
    elif how == "truncate-shard":
        target = shard(ck, last=nproc > 1)
        os.truncate(target, target.stat().st_size // 2)
    elif how == "delete-shard":
        target = shard(ck, last=nproc > 1)
        target.unlink()
    elif how == "delete-metadata":
        target = ck / ".metadata"
        target.unlink()
    elif how == "flip-metadata":
        target = ck / ".metadata"
        data = bytearray(target.read_bytes())
        mid = len(data) // 2
        data[mid : mid + 32] = bytes(b ^ 0xFF for b in data[mid : mid + 32])
        target.write_bytes(bytes(data))
    elif how == "state-garbage":
        target = _named_json(ck, "state", "trainer_state.json")
        target.write_text("{not json at all")
    elif how == "state-wrong-fields":
        target = _named_json(ck, "state", "trainer_state.json")
        target.write_text('{"step": "seven", "data_positions": -1}')
    elif how == "config-garbage":
        target = _named_json(ck, "config", "config.json")
        target.write_text("{not json at all")
    else:
        raise HarnessError(f"unknown damage {how}")
    res = ctx.run(resume_flags(flags, resume, ck), nproc=n)
    problems = refusal_problems(res)
    if not (target.name in message_lines(res.out, scrub=False) or PROBLEM.search(message_lines(res.out))):
        problems.append(f"names neither {target.name} nor the problem")
    return judge(problems, f"refused: {last_line(res.out)}")


def foreign(ctx: Ctx, how: str) -> tuple[bool, str]:
    """Point the run at another (real, compatible) run's checkpoint: ``latest`` holding a path that
    leaves the run dir (relative or absolute), or a step dir that is a symlink into the other run.
    The other run is at step 3, this one at step 2; resuming to step 5 with a save every step.
    Handled well: no traceback, the other run is untouched, and the run does not silently continue
    from the other run's state (it refuses, or continues from its own step 2: a step-3 checkpoint
    of its own appears)."""
    run, flags, _ = ctx.copy_template("vit1")
    other, _, _ = ctx.copy_template("other", "other-run")
    other_ck = newest_ckpt(other)
    own_before = tree_digest(other)
    ck = newest_ckpt(run)
    pointer = ck.parent / "latest"
    if how == "latest-relative":
        rel = os.path.relpath(other_ck, pointer.parent)
        pointer.write_text(rel + "\n")
    elif how == "latest-absolute":
        pointer.write_text(str(other_ck) + "\n")
    else:  # the newest step dir replaced by a symlink of the same name
        shutil.rmtree(ck)
        ck.symlink_to(other_ck, target_is_directory=True)
    res = ctx.run(
        {
            **flags,
            "--max-steps": "5",
            "--checkpoint.every": "1",
            "--checkpoint.keep": "10",
            "--checkpoint.resume": "auto",
        }
    )
    problems = []
    if res.timed_out:
        problems.append("timed out")
    if res.traceback:
        problems.append("traceback")
    if tree_digest(other) != own_before:
        problems.append("the other run's files changed")
    if res.rc == 0 and 3 not in ckpt_steps(run):
        problems.append("silently continued from the other run's step-3 checkpoint")
    if res.rc == 0 and not problems:
        return True, "continued from its own checkpoint"
    return judge(problems, f"refused: {last_line(res.out)}")


def cases(nproc: int) -> list[Case]:
    out = []
    for how, n, resume in (
        ("flip-shard-middle", 1, "auto"),
        ("flip-shard-middle", 1, "path"),
        ("flip-shard-middle", nproc, "auto"),
        ("truncate-shard", 1, "auto"),
        ("truncate-shard", nproc, "auto"),
        ("delete-shard", 1, "auto"),
        ("delete-shard", nproc, "auto"),
        ("delete-metadata", 1, "auto"),
        ("delete-metadata", 1, "path"),
        ("flip-metadata", 1, "auto"),
        ("state-garbage", 1, "auto"),
        ("state-garbage", 1, "path"),
        ("state-wrong-fields", 1, "auto"),
        ("config-garbage", 1, "auto"),
    ):
        out.append(case(f"{how}-{resume}-{n}rank", damage, nproc=n, how=how, resume=resume))
    for how in ("latest-relative", "latest-absolute", "step-dir-symlink"):
        out.append(case(f"{how}-to-other-run", foreign, how=how))
    return out
