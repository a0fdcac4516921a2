"""ownership: whose run directory is it? Links into other runs, a directory changing under a
starting or a running job, checkpoint names that disagree with their contents, stale locks, and
pointer and lock files that are not what they seem."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

from .harness import (
    TIMEOUT,
    Case,
    Ctx,
    base_flags,
    case,
    ckpt_dirs,
    judge,
    kill_everything,
    last_line,
    message_lines,
    newest_ckpt,
    refusal_problems,
    sha256,
    success_problems,
    tree_digest,
)
from .run_dir import duplicated_steps

GIB = 1 << 30
MEMORY_LIMIT = 3 * GIB // 2  # heap of a trainer process on a shared node: a tiny run needs far less
SITE = """
import os, resource, sys, time
limit = os.environ.get("UCFVIT_ACC_DATA_LIMIT")
if limit:
    resource.setrlimit(resource.RLIMIT_DATA, (int(limit), int(limit)))
slow = os.environ.get("UCFVIT_ACC_SLOW_PATH")
if slow:
    done = []
    def hook(event, args):
        if event != "open" or done or isinstance(args[0], int) or not os.fsdecode(args[0]).startswith(slow):
            return
        done.append(True)
        open(os.environ["UCFVIT_ACC_READING"], "w").close()
        end = time.monotonic() + 300
        while not os.path.exists(os.environ["UCFVIT_ACC_GO"]) and time.monotonic() < end:
            time.sleep(0.05)
    sys.addaudithook(hook)
"""


def site_env(ctx: Ctx, **values: str) -> dict[str, str]:
    """The environment of a trainer whose start runs ``SITE`` (a memory limit, a slow file system)."""
    site = ctx.dir / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITE)
    path = os.pathsep.join([str(Path(__file__).resolve().parents[2]), str(site)])
    return {"PYTHONPATH": path, "UCFVIT_ACC_DATA_LIMIT": str(MEMORY_LIMIT), **values}


def names(res_out: str, *tokens: str) -> list[str]:
    """The tokens (paths or words) the message lines of ``res_out`` do not name."""
    said = message_lines(res_out, scrub=False)
    return [t for t in tokens if t not in said]


def refused_untouched(ctx: Ctx, run: Path, flags: dict, named: str, env: dict | None = None) -> tuple[bool, str]:
    """Run ``flags``: handled well when refused cleanly naming ``named``, ``run`` byte-identical."""
    before = tree_digest(run)
    res = ctx.run(flags, timeout=TIMEOUT, env=env)
    problems = refusal_problems(res) + [f"does not name {t}" for t in names(res.out, named)]
    if tree_digest(run) != before:
        problems.append("the run directory changed (checkpoints or metrics written, moved or deleted)")
    return judge(problems, f"refused: {last_line(res.out)}")


# --------------------------------------------------------------------------------------------
# links into another run


def linked_checkpoints(ctx: Ctx, mode: str) -> tuple[bool, str]:
    """Run B's ``checkpoints`` is a symlink to run A's (a reused scratch link, a ``cp -a`` of a run
    dir); B starts with --run.overwrite, or resumes with --checkpoint.resume auto. Handled well: B
    refused cleanly naming its link; A's files byte-identical."""
    other, flags, _ = ctx.copy_template("vit1", dest="A")
    mine = ctx.dir / "B"
    mine.mkdir()
    (mine / "checkpoints").symlink_to(other / "checkpoints")
    extra = {"--run.overwrite": []} if mode == "overwrite" else {"--max-steps": "3"}
    resume = "none" if mode == "overwrite" else "auto"
    args = {**flags, "--run.dir": str(mine), "--checkpoint.resume": resume, **extra}
    return refused_untouched(ctx, other, args, str(mine / "checkpoints"))


def linked_checkpoints_concurrent(ctx: Ctx) -> tuple[bool, str]:
    """Run A trains; meanwhile run B, whose ``checkpoints`` links to A's, starts with
    --checkpoint.resume auto. Handled well: B refused cleanly within 60 s naming its link, while A
    trains on; A's metrics have no repeated steps."""
    run_a, mine = ctx.dir / "A", ctx.dir / "B"
    flags = {**base_flags(), "--max-steps": "400", "--checkpoint.every": "5", "--checkpoint.keep": "2"}
    first, first_log = ctx.start({**flags, "--run.dir": str(run_a), "--checkpoint.resume": "none"})
    try:
        if not ctx.wait_for_step(first, run_a, first_log, 6, TIMEOUT):
            return False, f"inconclusive: run A never got going ({first.poll()}): {last_line(first_log.read_text())}"
        mine.mkdir()
        (mine / "checkpoints").symlink_to(run_a / "checkpoints")
        res = ctx.run({**flags, "--run.dir": str(mine), "--checkpoint.resume": "auto"}, timeout=60)
        problems = refusal_problems(res) + [f"does not name {t}" for t in names(res.out, str(mine / "checkpoints"))]
        if first.poll() is not None:
            problems.append(f"run A stopped (exit {first.poll()})")
    finally:
        kill_everything(first)
    problems += duplicated_steps(run_a)[:2]
    return judge(problems, f"B refused, A trained on: {last_line(res.out)}")


# --------------------------------------------------------------------------------------------
# a directory changing under a job


def plan_before_lock(ctx: Ctx) -> tuple[bool, str]:
    """Job B (--checkpoint.resume auto into an empty dir, --init.from on a slow file system) has
    planned a new run and is reading its weights when job A trains in the same directory from start
    to finish. Handled well: B does not write over A (A's checkpoints and metrics byte-identical),
    and B ends cleanly (refused with one line, or run without touching A's files)."""
    init, _, _ = ctx.copy_template("vit1", dest="init")
    run = ctx.dir / "run"
    reading, go = ctx.dir / "reading", ctx.dir / "go"
    env = site_env(ctx, UCFVIT_ACC_SLOW_PATH=str(init), UCFVIT_ACC_READING=str(reading), UCFVIT_ACC_GO=str(go))
    flags = {**base_flags(), "--run.dir": str(run), "--checkpoint.every": "1"}
    late, late_log = ctx.start({**flags, "--checkpoint.resume": "auto", "--init.from": str(newest_ckpt(init))}, env=env)
    try:
        end = time.monotonic() + TIMEOUT
        while not reading.exists() and late.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        if not reading.exists():
            res = ctx.finish(late, late_log, TIMEOUT)
            if res.rc not in (0, None) and not res.traceback and not ckpt_dirs(run):
                return True, f"refused before reading the weights: {last_line(res.out)}"
            return False, f"inconclusive: job B never read --init.from ({res.brief()}): {last_line(res.out)}"
        res_a = ctx.run({**flags, "--checkpoint.resume": "none"})
        if res_a.rc != 0:
            return False, f"inconclusive: job A failed ({res_a.brief()}): {last_line(res_a.out)}"
        before = {**tree_digest(run / "checkpoints"), "metrics": sha256(run / "metrics.jsonl")}
        go.touch()
        res = ctx.finish(late, late_log, TIMEOUT)
    finally:
        go.touch()
        kill_everything(late)
    problems = []
    if res.timed_out or res.traceback:
        problems.append("job B: " + ("timed out" if res.timed_out else "traceback"))
    after = {**tree_digest(run / "checkpoints"), "metrics": sha256(run / "metrics.jsonl")}
    changed = sorted(k for k in before if after.get(k) != before[k])
    if changed:
        problems.append(f"job A's files changed: {changed[:3]}")
    what = "refused" if res.rc not in (0, None) else "ran"
    return judge(problems, f"job B {what} without touching job A's run: {last_line(res.out)}")


def deleted_live_dir(ctx: Ctx) -> tuple[bool, str]:
    """Job A trains; its run directory is deleted (rm -rf) and job B starts a fresh run there and
    finishes. Handled well: B exits 0 with its own checkpoints and a metrics log without repeated
    steps, and A stops (cleanly, with a line saying why) instead of writing into B's directory."""
    run = ctx.dir / "run"
    flags = {**base_flags(), "--run.dir": str(run), "--checkpoint.resume": "none"}
    first, first_log = ctx.start({**flags, "--max-steps": "400", "--checkpoint.every": "5"})
    try:
        if not ctx.wait_for_step(first, run, first_log, 6, TIMEOUT):
            return False, f"inconclusive: job A never got going ({first.poll()}): {last_line(first_log.read_text())}"
        os.system(f"rm -rf '{run}'")
        res_b = ctx.run({**flags, "--max-steps": "10", "--checkpoint.every": "5"})
        res_a = ctx.finish(first, first_log, 60)
    finally:
        kill_everything(first)
    problems = success_problems(res_b, "job B")
    if res_a.timed_out:
        problems.append("job A still training 60 s after B finished")
    elif res_a.traceback:
        problems.append("job A: traceback")
    problems += duplicated_steps(run)[:2]
    state = run / "checkpoints" / "step-00000010" / "trainer_state.json"
    if not problems and (not state.is_file() or json.loads(state.read_text()).get("step") != 10):
        problems.append("job B's step-10 checkpoint missing or overwritten")
    return judge(problems, f"B ran; A stopped: {last_line(res_a.out)}")


# --------------------------------------------------------------------------------------------
# checkpoint names against their contents


def step_name_lies(ctx: Ctx, how: str) -> tuple[bool, str]:
    """step-00000001 renamed (or aliased by a symlink) to step-00000009, latest naming it; resume
    auto. Handled well: refused cleanly naming step-00000009; nothing written, moved or deleted
    (metrics.jsonl unchanged)."""
    run, flags, _ = ctx.copy_template("vit3")
    ckpts = run / "checkpoints"
    if how == "renamed":
        os.rename(ckpts / "step-00000001", ckpts / "step-00000009")
    else:
        (ckpts / "step-00000009").symlink_to("step-00000001")
    (ckpts / "latest").write_text("step-00000009")
    args = {**flags, "--max-steps": "4", "--checkpoint.keep": "10", "--checkpoint.resume": "auto"}
    return refused_untouched(ctx, run, args, "step-00000009")


def negative_step(ctx: Ctx) -> tuple[bool, str]:
    """The newest checkpoint records step -2 in trainer_state.json (its manifest recomputed to
    match); resume auto. Handled well: refused cleanly naming the checkpoint; no step--N directory
    and nothing else written."""
    run, flags, _ = ctx.copy_template("vit1")
    ckpt = newest_ckpt(run)
    state = ckpt / "trainer_state.json"
    record = json.loads(state.read_text())
    record["step"] = -2
    state.write_text(json.dumps(record))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["trainer_state.json"] = {"size": state.stat().st_size, "sha256": sha256(state)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    ok, reason = refused_untouched(ctx, run, {**flags, "--max-steps": "3", "--checkpoint.resume": "auto"}, ckpt.name)
    negative = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step--")]
    return (False, f"{reason}; created {negative}") if negative else (ok, reason)


# --------------------------------------------------------------------------------------------
# stale locks


def write_lock(run: Path, mtime: float | None = None, **record: object) -> None:
    (run / ".lock").write_text(json.dumps(record))
    if mtime is not None:
        os.utime(run / ".lock", (mtime, mtime))


def resumes_or_says_what_to_do(ctx: Ctx, run: Path, flags: dict) -> tuple[bool, str]:
    res = ctx.run({**flags, "--max-steps": "3", "--checkpoint.resume": "auto"})
    if res.rc == 0 and not res.traceback:
        return True, f"took the stale lock over and resumed: {last_line(res.out)}"
    problems = refusal_problems(res)
    said = message_lines(res.out, scrub=False)
    if str(run / ".lock") not in said or not re.search(r"delete|remove", said, re.I):
        problems.append("refused without saying to delete the lock if its job is gone")
    return judge(problems, f"refused, saying what to do: {last_line(res.out)}")


def future_lock(ctx: Ctx) -> tuple[bool, str]:
    """A lock from another host whose heartbeat is dated a day in the future (a wrong clock, a
    copied file); resume auto. Handled well: the lock is taken over and the run resumes (exit 0),
    or a clean refusal naming the lock and saying to delete it if its job is gone."""
    run, flags, _ = ctx.copy_template("vit1")
    write_lock(run, time.time() + 86400, job="proc:node-b:4242", host="node-b", pid=4242)
    return resumes_or_says_what_to_do(ctx, run, flags)


def reused_pid_lock(ctx: Ctx, recorded: bool) -> tuple[bool, str]:
    """A lock of this host naming a live pid that is not the job's process (the pid was reused);
    with ``recorded``, the lock records when its process started, which differs. Handled well:
    resumes (exit 0) or refuses cleanly naming the lock and saying to delete it if its job is gone."""
    run, flags, _ = ctx.copy_template("vit1")
    host, pid = socket.gethostname(), os.getpid()  # this harness: alive, and not a trainer
    extra = {}
    if recorded:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        extra = {"start": "1", "boot": boot}
    write_lock(run, job=f"proc:{host}:{pid}", host=host, pid=pid, **extra)
    if not recorded:
        return resumes_or_says_what_to_do(ctx, run, flags)
    res = ctx.run({**flags, "--max-steps": "3", "--checkpoint.resume": "auto"})
    return judge(success_problems(res, "resume"), f"took the stale lock over: {last_line(res.out)}")


# --------------------------------------------------------------------------------------------
# pointer and lock files that are not small regular files


def huge_or_fifo(ctx: Ctx, which: str, kind: str) -> tuple[bool, str]:
    """``latest`` or ``.lock`` is a 3 GiB sparse file, or ``latest`` a FIFO; resume auto under a
    1.5 GiB heap limit. Handled well: refused cleanly naming the file (or, for a FIFO latest,
    resumed from the newest checkpoint) without blocking; the checkpoints unchanged."""
    run, flags, _ = ctx.copy_template("vit1")
    path = run / "checkpoints" / "latest" if which == "latest" else run / ".lock"
    before = {d.name: tree_digest(d) for d in ckpt_dirs(run)}  # not the 3 GiB file itself
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(b"")
        os.truncate(path, 3 * GIB)
    res = ctx.run({**flags, "--max-steps": "3", "--checkpoint.resume": "auto"}, timeout=120, env=site_env(ctx))
    if kind == "fifo" and res.rc == 0 and not res.traceback:
        return True, f"resumed, the FIFO not read: {last_line(res.out)}"
    problems = refusal_problems(res) + [f"does not name {t}" for t in names(res.out, str(path))]
    if {d.name: tree_digest(d) for d in ckpt_dirs(run)} != before:
        problems.append("checkpoints changed")
    return judge(problems, f"refused: {last_line(res.out)}")


def cases(nproc: int) -> list[Case]:
    return [
        case("linked-checkpoints-overwrite", linked_checkpoints, mode="overwrite"),
        case("linked-checkpoints-resume-auto", linked_checkpoints, mode="auto"),
        case("linked-checkpoints-concurrent", linked_checkpoints_concurrent, slow=True),
        case("plan-before-lock-slow-init", plan_before_lock, slow=True),
        case("deleted-live-run-dir", deleted_live_dir, slow=True),
        case("step-dir-renamed", step_name_lies, how="renamed"),
        case("step-dir-aliased-by-link", step_name_lies, how="link"),
        case("negative-step", negative_step),
        case("lock-from-the-future", future_lock),
        case("lock-pid-reused", reused_pid_lock, recorded=True),
        case("lock-live-pid-old-format", reused_pid_lock, recorded=False),
        case("latest-sparse-3gib", huge_or_fifo, which="latest", kind="sparse"),
        case("lock-sparse-3gib", huge_or_fifo, which="lock", kind="sparse"),
        case("latest-fifo", huge_or_fifo, which="latest", kind="fifo"),
    ]
