"""run_dir: reusing, racing on and crashing in run directories."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from .harness import (
    TIMEOUT,
    Case,
    Ctx,
    HarnessError,
    base_flags,
    case,
    ckpt_dirs,
    ckpt_steps,
    jsonl_records,
    judge,
    kill_everything,
    last_line,
    max_logged_step,
    message_lines,
    newest_ckpt,
    refusal_problems,
    sha256,
    shard,
    success_problems,
    tree_digest,
)

SAYS_WHAT = re.compile(
    r"resum|continu|already|fresh|from scratch|nothing (left )?to do|new run|up to date|start(ing|ed)? over", re.I
)
SAYS_DONE = re.compile(r"already|nothing (left )?to do|no steps? left|reached|up to date|complete|finished", re.I)
MARK_KEYS = ("event", "resume", "resumed", "restart", "run_start", "start", "segment", "session")


def all_digests(run: Path) -> list[dict[str, str]]:
    """For each directory under ``run``: its files' names and hashes (to find a moved checkpoint)."""
    out = []
    for root, _, files in os.walk(run):
        out.append({name: sha256(Path(root) / name) for name in files if not (Path(root) / name).is_symlink()})
    return out


def preserved_somewhere(run: Path, original: dict[str, str]) -> bool:
    """The files of a checkpoint dir (names and contents) exist together in some dir under ``run``."""
    flat = {k: v for k, v in original.items() if "/" not in k}
    return any(all(d.get(k) == v for k, v in flat.items()) for d in all_digests(run))


def duplicated_steps(run: Path) -> list[str]:
    """Step records that repeat (or go back) with no record in between that marks a new segment
    (a record without ``step``, or one with an event/resume-like key)."""
    problems = []
    for path, records in jsonl_records(run).items():
        last = None
        for rec in records:
            if "step" not in rec or any(k in rec for k in MARK_KEYS):
                last = None
                continue
            step = rec.get("step")
            if not isinstance(step, (int, float)):
                continue
            if last is not None and step <= last:
                problems.append(f"{path.name}: step {step} after {last}")
            last = step
    return problems


def fresh_over_checkpoints(ctx: Ctx) -> tuple[bool, str]:
    """--checkpoint.resume none into a run dir that has checkpoints. Handled well: refused with a
    message about the checkpoints/resume; the old checkpoints byte-identical."""
    run, flags, _ = ctx.copy_template("vit1")
    parent = newest_ckpt(run).parent
    before = tree_digest(parent)
    res = ctx.run({**flags, "--checkpoint.resume": "none"})
    problems = refusal_problems(res)
    if not re.search(r"checkpoint|resume", message_lines(res.out), re.I):
        problems.append("message mentions neither checkpoints nor resuming")
    if tree_digest(parent) != before:
        problems.append("old checkpoints changed")
    return judge(problems, f"refused: {last_line(res.out)}")


def fresh_into_metrics_only(ctx: Ctx) -> tuple[bool, str]:
    """A fresh run into a dir that holds only an earlier run's metrics.jsonl. Handled well: refused
    (clean), or it runs and the old log survives (its bytes are in some file under the run dir)
    and no log has repeated steps without a marker between the runs."""
    src = ctx.m.template("vit1") / "metrics.jsonl"
    run = ctx.dir / "run"
    run.mkdir()
    old = src.read_bytes()
    (run / "metrics.jsonl").write_bytes(old)
    res = ctx.run({**base_flags(), "--run.dir": str(run), "--checkpoint.resume": "none"})
    if res.rc not in (0, None) and not res.traceback:
        return True, f"refused: {last_line(res.out)}"
    problems = success_problems(res)
    if not any(old in p.read_bytes() for p in run.rglob("*") if p.is_file()):
        problems.append("old metrics lost")
    problems += duplicated_steps(run)[:2]
    return judge(problems, "ran; old log kept, steps not mixed")


def resume_older(ctx: Ctx, keep: str) -> tuple[bool, str]:
    """Resume by PATH from step 1 while steps 2 and 3 exist (with a different lr: a branch).
    Handled well: exit 0, the chosen checkpoint still there unchanged, and the newer checkpoints
    not lost (same files, same bytes, anywhere under the run dir); or a clean refusal that leaves
    everything intact and mentions the newer checkpoints."""
    run, flags, _ = ctx.copy_template("vit3")
    dirs = ckpt_dirs(run)
    if len(dirs) < 3:
        raise HarnessError(f"expected 3 checkpoints, found {[d.name for d in dirs]}")
    chosen, newer = dirs[0], dirs[1:]
    originals = {d.name: tree_digest(d) for d in dirs}
    res = ctx.run({**flags, "--checkpoint.keep": keep, "--optim.lr": "0.001", "--checkpoint.resume": str(chosen)})
    problems = []
    if res.traceback:
        problems.append("traceback")
    if res.timed_out:
        problems.append("timed out")
    if not chosen.is_dir() or tree_digest(chosen) != originals[chosen.name]:
        problems.append(f"chosen {chosen.name} gone or changed")
    lost = [d.name for d in newer if not preserved_somewhere(run, originals[d.name])]
    if lost:
        problems.append(f"newer checkpoints lost/overwritten: {lost}")
    if res.rc not in (0, None) and not problems:
        said = message_lines(res.out, scrub=False)
        if any(d.name in said for d in newer) or re.search(r"newer|later", message_lines(res.out), re.I):
            return True, f"refused, all intact: {last_line(res.out)}"
        problems.append("refused without mentioning the newer checkpoints")
    elif res.rc not in (0, None):
        problems.append(f"failed ({res.brief()})")
    return judge(problems, "branched; chosen and newer checkpoints kept")


def concurrent_runs(ctx: Ctx, second: str) -> tuple[bool, str]:
    """Start a long run, then a second run on the same dir. Handled well: the second is refused
    (clean, within 60 s, while the first is still running); the first finishes with exit 0 and a
    checkpoint that a later resume accepts."""
    run = ctx.dir / "run"
    flags = {
        **base_flags(),
        "--run.dir": str(run),
        "--max-steps": "400",
        "--checkpoint.every": "100",
        "--metrics.log-every": "10",
    }
    first, first_log = ctx.start({**flags, "--checkpoint.resume": "none"})
    try:
        if not ctx.wait_for_step(first, run, first_log, 10, TIMEOUT):
            return False, f"first run never got going ({first.poll()}): {last_line(first_log.read_text())}"
        res = ctx.run({**flags, "--checkpoint.resume": second}, timeout=60)
        first_alive = first.poll() is None
        problems = []
        if res.timed_out:
            problems.append("second run not refused within 60 s")
        elif res.rc == 0:
            problems.append("second run went ahead (exit 0)")
        if res.traceback:
            problems.append("second run: traceback")
        if problems:
            return judge(problems, "")
        if not first_alive:
            return False, "inconclusive: the first run had ended before the second was refused"
        first_res = ctx.finish(first, first_log, 2 * TIMEOUT)
        problems = success_problems(first_res, "first run")
        if not problems:
            check = ctx.run({**flags, "--max-steps": "401", "--checkpoint.resume": "auto"})
            problems = success_problems(check, "resume of the first run")
        return judge(problems, f"second refused: {last_line(res.out)}")
    finally:
        kill_everything(first)


def stale_tmp(ctx: Ctx, ahead: int) -> tuple[bool, str]:
    """A half-written ``step-N.tmp`` dir left by a crash beside the checkpoints (N = newest step +
    ``ahead``). Handled well: resume auto carries on to step 4 (exit 0, no traceback)."""
    run, flags, _ = ctx.copy_template("vit1")
    ck = newest_ckpt(run)
    digits = re.findall(r"\d+", ck.name)[-1]
    name = ck.name[: ck.name.rindex(digits)] + str(int(digits) + ahead).zfill(len(digits)) + ".tmp"
    tmp = ck.parent / name
    tmp.mkdir()
    (tmp / ".metadata").write_bytes(os.urandom(100))
    first = shard(ck)
    (tmp / first.name).write_bytes(first.read_bytes()[:1000])
    res = ctx.run({**flags, "--max-steps": "4", "--checkpoint.resume": "auto", "--checkpoint.keep": "10"})
    problems = success_problems(res, "resume")
    if not problems and 4 not in ckpt_steps(run):
        problems.append("no step-4 checkpoint")
    state = "removed" if not tmp.exists() else "ignored"
    return judge(problems, f"resumed; stale {name} {state}")


def metrics_after_crash(ctx: Ctx) -> tuple[bool, str]:
    """SIGKILL a run between checkpoints (logged steps past the last save), then resume auto.
    Handled well: the resume succeeds and no metrics log repeats steps without a resume marker."""
    run = ctx.dir / "run"
    flags = {**base_flags(), "--run.dir": str(run), "--max-steps": "200", "--checkpoint.every": "20"}
    proc, log = ctx.start({**flags, "--checkpoint.resume": "none"})
    try:
        end = time.monotonic() + TIMEOUT
        while time.monotonic() < end and proc.poll() is None:
            step = max_logged_step(run)
            if step >= 25 and 4 <= step % 20 <= 15:
                break
            time.sleep(0.02)
        else:
            return False, f"inconclusive: could not interrupt the run ({proc.poll()})"
    finally:
        kill_everything(proc)
    killed_at = max_logged_step(run)
    res = ctx.run({**flags, "--max-steps": str(killed_at + 5), "--checkpoint.resume": "auto"})
    problems = success_problems(res, "resume") + duplicated_steps(run)[:2]
    return judge(problems, f"killed after step {killed_at}; resumed; log has no repeated steps")


def blocked_path(ctx: Ctx, which: str) -> tuple[bool, str]:
    """``checkpoints`` is a regular file / ``metrics.jsonl`` is a directory. Handled well: refused
    before training (clean, naming it; no metrics records / no checkpoint written)."""
    run = ctx.dir / "run"
    run.mkdir()
    if which == "checkpoints":
        (run / "checkpoints").write_text("not a directory\n")
    else:
        (run / "metrics.jsonl").mkdir()
    res = ctx.run({**base_flags(), "--run.dir": str(run), "--checkpoint.every": "1", "--checkpoint.resume": "none"})
    problems = refusal_problems(res)
    if which not in message_lines(res.out, scrub=False):
        problems.append(f"{which} not named")
    trained = any(any("step" in r for r in recs) for recs in jsonl_records(run).values()) or ckpt_dirs(run)
    if trained:
        problems.append("trained before failing")
    return judge(problems, f"refused: {last_line(res.out)}")


def same_command_twice(ctx: Ctx) -> tuple[bool, str]:
    """The same command (no resume flag) twice. Handled well: both exit 0, and the second says
    what it did (resumed / continued / already done / fresh)."""
    run = ctx.dir / "run"
    flags = {**base_flags(), "--run.dir": str(run)}
    first = ctx.run(flags)
    problems = success_problems(first, "first run")
    if problems:
        return judge(problems, "")
    second = ctx.run(flags)
    problems = success_problems(second, "second run")
    said = SAYS_WHAT.search(message_lines(second.out))
    if not problems and not said:
        problems.append("second run does not say whether it resumed or started fresh")
    return judge(problems, f"second run: {said.group(0) if said else ''}")


def resume_at_max(ctx: Ctx) -> tuple[bool, str]:
    """Resume auto of a run that already reached --max-steps. Handled well: exit 0 and says so."""
    run, flags, _ = ctx.copy_template("vit1")
    res = ctx.run({**flags, "--checkpoint.resume": "auto"})
    problems = success_problems(res)
    if not problems and not SAYS_DONE.search(message_lines(res.out)):
        problems.append("does not say there is nothing left to do")
    return judge(problems, "says it is done")


def cases(nproc: int) -> list[Case]:
    return [
        case("fresh-over-checkpoints", fresh_over_checkpoints),
        case("fresh-into-dir-with-only-metrics", fresh_into_metrics_only),
        case("resume-older-by-path-keep3", resume_older, keep="3"),
        case("resume-older-by-path-keep2", resume_older, keep="2"),
        case("concurrent-same-command", concurrent_runs, slow=True, second="none"),
        case("concurrent-resume-auto", concurrent_runs, slow=True, second="auto"),
        case("stale-tmp-next-step", stale_tmp, ahead=1),
        case("stale-tmp-far-step", stale_tmp, ahead=7),
        case("metrics-after-crash-resume", metrics_after_crash),
        case("checkpoints-is-a-file", blocked_path, which="checkpoints"),
        case("metrics-jsonl-is-a-dir", blocked_path, which="metrics.jsonl"),
        case("same-command-twice", same_command_twice),
        case("resume-at-max-steps", resume_at_max),
    ]
