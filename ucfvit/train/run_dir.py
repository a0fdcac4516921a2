"""The run directory: one job writes it at a time, and a new run never eats an old one.

Layout::

    <run.dir>/
        .lock            the job writing this directory (job id, host, pid; its mtime is a heartbeat)
        config.json      metrics.jsonl      checkpoints/      model.safetensors (export)
        abandoned/       what a resume from an older step left behind: the later checkpoints and
                         metrics lines of the abandoned branch, moved here (never deleted)

Every rank calls :func:`inspect_run_dir` before the first collective: it only reads, and raises a
``ValueError`` naming the option to change when the run must not start (a fresh run into a used
directory, a directory held by a live job, files of the wrong type). :class:`RunLock` is then
taken by every rank of the job (ranks agree on a job id from the launcher's environment), the
directory is inspected again under it (:func:`recheck_run_dir`: another job may have written it
meanwhile), and after all ranks have decided, rank 0 carries the plan out with
:func:`prepare_run_dir`. Rank 0 re-reads the lock at every sync point (:meth:`RunLock.lost`): a
run whose lock is gone or taken stops without writing.

A run writes only inside its own directory: an entry it writes (:data:`WRITTEN`) that is a link
leading out of it, and any link among its checkpoints, is refused before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ucfvit.files import KIB, read_bounded

from .atomic import write_atomic
from .checkpoint import (
    CheckpointError,
    checkpoint_step,
    find_checkpoint,
    is_complete,
    link_refusal,
    recorded_step,
    refuse_outside,
    verify_step,
)
from .manifest import STATE_FILE, sha256, verify_structure

__all__ = ["RunDirPlan", "RunLock", "inspect_run_dir", "job_id", "prepare_run_dir", "recheck_run_dir"]

LOCK, METRICS, CONFIG, ABANDONED = ".lock", "metrics.jsonl", "config.json", "abandoned"
# A lock whose holder cannot be checked by pid (another host) is stale when its heartbeat is older.
HEARTBEAT_S, STALE_AFTER_S = 30.0, 300.0
LOCK_LIMIT = 4 * KIB  # a lock record is ~300 bytes
# What a run writes directly under its directory: none of these may be a link leading out of it.
WRITTEN = (
    LOCK,
    METRICS,
    CONFIG,
    ABANDONED,
    "checkpoints",
    "data",
    "model.safetensors",
    "model_config.json",
    "init_report.txt",
    "pictures",
    "curves.png",
    "tensorboard",
)
_STEP_ENTRY = re.compile(r"^step-(\d+)(\.tmp)?$")


def job_id() -> str:
    """What the ranks of one job share and another job does not: the SLURM job step, else the
    launcher's rendezvous, else this process. A torchrun restart of a job keeps its id."""
    env = os.environ
    if "SLURM_JOB_ID" in env:
        return f"slurm:{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '')}:{_slurm_restart()}"
    if "MASTER_PORT" in env:
        return f"rdzv:{env.get('MASTER_ADDR', '')}:{env['MASTER_PORT']}:{env.get('TORCHELASTIC_RUN_ID', '')}"
    return f"proc:{socket.gethostname()}:{os.getpid()}"


def _slurm_restart() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (zombies count as dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not Path("/proc").is_dir()


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (field 22 of /proc/PID/stat, in clock ticks since boot), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


@dataclass
class _Holder:
    job: str
    host: str
    pid: int
    age_s: float
    slurm_job: str | None = None
    slurm_restart: int = 0
    start: str | None = None  # the holder's process start time and the host's boot id, when recorded
    boot: str | None = None

    def verdict(self) -> tuple[bool, str]:
        """(stale, why): whether the job holding the lock is gone, and what that belief rests on."""
        if self.job == job_id():
            return False, "it is this job"
        mine = os.environ.get("SLURM_JOB_ID")
        if mine is not None and self.slurm_job == mine and self.slurm_restart < _slurm_restart():
            return True, f"it is an earlier run of this requeued SLURM job {mine}"
        if self.host == socket.gethostname():
            if self.boot is not None and _boot_id() not in (None, self.boot):
                return True, "this host has rebooted since it was written"
            if not _alive(self.pid):
                return True, f"process {self.pid} no longer runs on this host"
            if self.start is not None and _start_time(self.pid) not in (None, self.start):
                return True, f"pid {self.pid} now belongs to another process (it started at another time)"
            return False, f"process {self.pid} runs on this host"
        if self.age_s < -STALE_AFTER_S:
            return True, f"its heartbeat is dated {-self.age_s:.0f} s in the future (a wrong clock or a copied file)"
        if self.age_s > STALE_AFTER_S:
            return True, f"it has had no heartbeat for {self.age_s:.0f} s"
        return False, (
            f"its heartbeat is {max(self.age_s, 0):.0f} s old, and a job on another host counts as gone only "
            f"after {STALE_AFTER_S:.0f} s"
        )

    def is_stale(self) -> bool:
        return self.verdict()[0]

    def __str__(self) -> str:
        beat = f"{self.age_s:.0f} s ago" if self.age_s >= 0 else f"dated {-self.age_s:.0f} s in the future"
        return f"job {self.job} (pid {self.pid} on {self.host}, last heartbeat {beat})"


def _read_lock(path: Path) -> _Holder | None:
    """The holder recorded in the lock file ``path`` (None if there is none). The file is read within
    :data:`LOCK_LIMIT` bytes: a FIFO or a huge file raises a ``ValueError`` naming it."""
    if not os.path.lexists(path):
        return None
    try:
        raw = read_bounded(path, LOCK_LIMIT, "the run lock")
        age = time.time() - path.stat().st_mtime
    except (ValueError, OSError) as err:
        if not os.path.lexists(path):
            return None  # released meanwhile
        raise ValueError(f"{err}; if no job runs in {path.parent}, delete {path}") from None
    try:
        record = json.loads(raw)
        optional = {k: None if record.get(k) is None else str(record[k]) for k in ("start", "boot")}
        return _Holder(
            str(record["job"]),
            str(record["host"]),
            int(record["pid"]),
            age,
            record.get("slurm_job"),
            int(record.get("slurm_restart", 0)),
            **optional,
        )
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return _Holder("unreadable", "?", -1, age)


def _in_use(run_dir: Path, holder: _Holder, why: str) -> ValueError:
    return ValueError(
        f"--run.dir={run_dir} is in use by {holder}, believed live because {why}: wait for it to finish; "
        f"if that job is gone, delete {Path(run_dir) / LOCK}; or choose another --run.dir"
    )


class RunLock:
    """``<run.dir>/.lock``: refuses a second job on one run directory; a lock left by a dead job
    (its pid gone or reused on this host, or no heartbeat for ``STALE_AFTER_S`` from another host, or
    a heartbeat that far in the future) is taken over."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def check(run_dir: Path) -> None:
        """Raise if a live job other than this one holds ``run_dir`` (read-only)."""
        holder = _read_lock(Path(run_dir) / LOCK)
        if holder is not None:
            stale, why = holder.verdict()
            if holder.job != job_id() and not stale:
                raise _in_use(run_dir, holder, why)

    def acquire(self) -> RunLock:
        """Take the lock (every rank of the job may call this; they agree on :func:`job_id`)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps(
            {
                "job": job_id(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "slurm_job": os.environ.get("SLURM_JOB_ID"),
                "slurm_restart": _slurm_restart(),
                "start": _start_time(os.getpid()),
                "boot": _boot_id(),
            }
        )
        for _ in range(5):
            tmp = self.path.with_name(f"{LOCK}.{socket.gethostname()}.{os.getpid()}")
            try:
                tmp.write_text(record)
            except OSError as err:  # a full disk or quota: one line, not a traceback
                tmp.unlink(missing_ok=True)
                raise ValueError(
                    f"--run.dir={self.path.parent}: cannot write the lock {self.path} ({err.strerror or err}); "
                    "free space or quota there, or choose another --run.dir"
                ) from None
            try:
                os.link(tmp, self.path)  # atomic create-with-content; fails if a lock exists
                return self
            except FileExistsError:
                holder = _read_lock(self.path)
                if holder is None:
                    continue  # released meanwhile: try again
                if holder.job == job_id():
                    return self  # a sibling rank of this job took it
                stale, why = holder.verdict()
                if not stale:
                    raise _in_use(self.path.parent, holder, why) from None
                if int(os.environ.get("RANK", "0")) == 0:
                    print(f"{self.path}: taking over the stale lock of {holder}: {why}", flush=True)
                # Stale: exactly one contender renames it away; everyone then retries the link.
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self.path, tmp.with_name(tmp.name + ".stale"))
                    os.unlink(tmp.with_name(tmp.name + ".stale"))
            finally:
                tmp.unlink(missing_ok=True)
        raise ValueError(f"--run.dir={self.path.parent}: could not take {self.path} (contended); try again")

    def lost(self) -> str | None:
        """Why this job no longer holds its lock (the file is gone: the run directory was deleted; or
        it names another job), or None while it does. Cheap: one small read (rank 0, at sync points)."""
        try:
            holder = _read_lock(self.path)
        except ValueError as err:
            return str(err)
        if holder is None:
            return f"{self.path} is gone"
        if holder.job != job_id():
            return f"{self.path} now names {holder}"
        return None

    def start_heartbeat(self) -> None:
        """Touch the lock every ``HEARTBEAT_S`` so other hosts can tell this job is alive (rank 0)."""

        def beat():
            while not self._stop.wait(HEARTBEAT_S):
                if self.lost() is None:  # never keep another job's lock looking alive
                    with contextlib.suppress(OSError):
                        os.utime(self.path)

        self._thread = threading.Thread(target=beat, name="ucfvit-run-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if this job holds it."""
        self._stop.set()
        with contextlib.suppress(ValueError):
            holder = _read_lock(self.path)
            if holder is not None and holder.job == job_id():
                self.path.unlink(missing_ok=True)


@dataclass
class RunDirPlan:
    """What a run does with its directory, decided by :func:`inspect_run_dir`."""

    path: Path
    checkpoint: Path | None
    action: Literal["fresh", "continue", "branch", "overwrite"]
    resume_step: int = 0
    move_aside: list[Path] = field(default_factory=list)
    stale_tmp: list[Path] = field(default_factory=list)
    seen: tuple = ()  # what the directory held when inspected (see :func:`recheck_run_dir`)

    def describe(self) -> str:
        where = f"run dir {self.path}"
        if self.action == "fresh" and self.checkpoint is None:
            return f"{where}: new run"
        if self.action == "overwrite":
            return f"{where}: --run.overwrite, the previous run's checkpoints and metrics were deleted"
        text = f"{where}: continuing from {self.checkpoint} (step {self.resume_step})"
        if self.action == "branch":
            names = ", ".join(p.name for p in self.move_aside)
            text += f"; the later checkpoints of the abandoned branch ({names}) moved to {self.path / ABANDONED}"
        return text


def _step_entries(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if _STEP_ENTRY.match(p.name))


def _metric_steps(path: Path) -> list[int]:
    steps = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                steps.append(int(json.loads(line)["step"]))
    return steps


def _check_types(run_dir: Path) -> None:
    """Refuse paths of the wrong kind now, not after training began."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--run.dir={run_dir} exists and is not a directory; choose another --run.dir")
    if not run_dir.exists():
        parent = next(p for p in run_dir.parents if p.exists())
        why = "not a directory" if not parent.is_dir() else "not writable"
        if why == "not a directory" or not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"--run.dir={run_dir} cannot be created ({parent} is {why}); choose another --run.dir")
        return
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ValueError(f"--run.dir={run_dir} is not writable; choose another --run.dir")
    for name, kind in (("checkpoints", "a directory"), (METRICS, "a file"), (CONFIG, "a file"), (LOCK, "a file")):
        path = run_dir / name
        wrong = path.exists() and (not path.is_dir() if kind == "a directory" else not path.is_file())
        if wrong:
            raise ValueError(f"{path} exists and is not {kind}: move it away or choose another --run.dir")


def _check_links(run_dir: Path) -> None:
    """Refuse, before anything is written, an entry the run writes that is a link leading out of
    ``run_dir`` (into another run: writing or pruning there would destroy it), and any link among
    the checkpoints (a ``step-N`` link aliases another step; ``latest`` must be a file)."""
    for name in WRITTEN:
        refuse_outside(run_dir, run_dir / name, ValueError)
    ckpt_root = run_dir / "checkpoints"
    if ckpt_root.is_dir():
        for entry in sorted(ckpt_root.iterdir()):
            if entry.is_symlink() and (_STEP_ENTRY.match(entry.name) or entry.name == "latest"):
                raise link_refusal(ckpt_root, entry)


def _check_name(step_dir: Path) -> None:
    """Refuse a sound ``step-N`` directory that records another step. A damaged one is reported
    when it is chosen: an older checkpoint's corruption does not stop a resume from the newest."""
    if not is_complete(step_dir):
        return
    try:
        files = verify_structure(step_dir)
        if sha256(step_dir / STATE_FILE) != files[STATE_FILE]["sha256"]:
            return
        if recorded_step(step_dir) == checkpoint_step(step_dir):
            return
    except CheckpointError:
        return
    verify_step(step_dir, files)


def _snapshot(run_dir: Path) -> tuple:
    """What decides a plan: the checkpoint entries, and the metrics and config files' sizes and times."""

    def stamp(path: Path) -> tuple | None:
        with contextlib.suppress(OSError):
            st = path.stat()
            return st.st_size, st.st_mtime_ns
        return None

    ckpt_root = run_dir / "checkpoints"
    names = sorted(os.listdir(ckpt_root)) if ckpt_root.is_dir() else []
    return tuple(names), stamp(ckpt_root / "latest"), stamp(run_dir / METRICS), stamp(run_dir / CONFIG)


def recheck_run_dir(plan: RunDirPlan, resume: str, overwrite: bool) -> RunDirPlan:
    """Inspect the directory again, now that this job holds its lock, and return that plan: the
    first inspection may be minutes old (a slow ``--init.from``), and another job may have written
    the directory meanwhile. Raise a ``ValueError`` if it did: the plan that would act on it was
    made for a directory that is no longer there."""
    now = inspect_run_dir(plan.path, resume, overwrite)
    if now.seen != plan.seen:
        raise ValueError(
            f"--run.dir={plan.path} changed while this job was starting (another job wrote it after this one "
            f"had planned: {plan.describe()}); nothing was written: run the command again to plan afresh, "
            "or choose another --run.dir"
        )
    return now


def inspect_run_dir(run_dir: Path, resume: str, overwrite: bool) -> RunDirPlan:
    """Decide (read-only) what this run does with ``run_dir`` given ``--checkpoint.resume`` and
    ``--run.overwrite``; raise a ``ValueError`` naming the option to change if it must not start."""
    run_dir = Path(run_dir).resolve()
    _check_types(run_dir)
    _check_links(run_dir)
    RunLock.check(run_dir)
    seen = _snapshot(run_dir)
    ckpt_root = run_dir / "checkpoints"
    entries = _step_entries(ckpt_root)
    stale = [p for p in entries if p.name.endswith(".tmp")]
    steps = [p for p in entries if not p.name.endswith(".tmp")]
    for step_dir in steps:  # the step recorded inside is the truth: a renamed copy would misorder them
        _check_name(step_dir)
    logged = _metric_steps(run_dir / METRICS)
    used = bool(steps) or (run_dir / METRICS).is_file() and (run_dir / METRICS).stat().st_size > 0
    if overwrite and resume == "auto":
        raise ValueError("--run.overwrite starts the run over: use it with --checkpoint.resume none, not auto")

    if resume == "none":
        ckpt = None
    elif resume == "auto":
        ckpt = find_checkpoint(run_dir)
    else:
        ckpt = find_checkpoint(Path(resume))
        if ckpt is None:
            raise ValueError(
                f"--checkpoint.resume={resume}: no complete checkpoint there; give a step-N directory or a run "
                "directory holding one, or --checkpoint.resume auto"
            )
        ckpt = ckpt.resolve()
    inside = ckpt is not None and ckpt.parent == ckpt_root

    if overwrite:
        if inside:
            raise ValueError(
                f"--run.overwrite would delete the checkpoint {ckpt} this run resumes from; "
                "choose another --run.dir or drop --run.overwrite"
            )
        return RunDirPlan(run_dir, ckpt, "overwrite", checkpoint_step(ckpt) if ckpt else 0, [], stale, seen)
    if used and not inside and resume != "auto":
        last = f"checkpoints up to step {checkpoint_step(steps[-1])}" if steps else "no checkpoint"
        logged_text = f", metrics up to step {max(logged)}" if logged else ""
        what = "a new run" if ckpt is None else f"a run from {ckpt}"
        raise ValueError(
            f"--run.dir={run_dir} already holds a run ({last}{logged_text}); to start {what} there would mix "
            "two runs. Continue it with --checkpoint.resume auto, pick a new --run.dir, or replace it with "
            "--run.overwrite"
        )
    if ckpt is None:
        return RunDirPlan(run_dir, None, "fresh", 0, [], stale, seen)
    step = checkpoint_step(ckpt)
    later = [p for p in steps if checkpoint_step(p) > step] if inside else []
    return RunDirPlan(run_dir, ckpt, "branch" if later else "continue", step, later, stale, seen)


def prepare_run_dir(plan: RunDirPlan, config: dict) -> None:
    """Carry out ``plan`` (rank 0 only, after every rank ran :func:`inspect_run_dir`): clean stale
    ``step-N.tmp`` directories, move an abandoned branch aside, cut ``metrics.jsonl`` back to the
    resumed step (dropped lines move aside too), and write ``config.json``."""
    run_dir, ckpt_root = plan.path, plan.path / "checkpoints"
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_links(run_dir)  # checked at inspection; refused here too, should one have appeared since
    for tmp in plan.stale_tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    if plan.action == "overwrite":
        shutil.rmtree(ckpt_root, ignore_errors=True)
        for name in (METRICS, "model.safetensors", "model_config.json"):
            (run_dir / name).unlink(missing_ok=True)
    aside = run_dir / ABANDONED / f"{time.strftime('%Y%m%d-%H%M%S')}-resumed-at-step-{plan.resume_step}"
    if plan.move_aside:
        aside.mkdir(parents=True, exist_ok=True)
        for path in plan.move_aside:
            os.replace(path, aside / path.name)
        if plan.checkpoint is not None and plan.checkpoint.parent == ckpt_root:
            write_atomic(ckpt_root / "latest", plan.checkpoint.name)
    _cut_metrics(run_dir / METRICS, plan.resume_step, aside)
    write_atomic(run_dir / CONFIG, json.dumps(config, indent=2))


def _cut_metrics(path: Path, step: int, aside: Path) -> None:
    """Keep the lines of steps <= ``step``; the others go to ``aside/metrics.jsonl``."""
    if not path.is_file():
        return
    keep, drop = [], []
    for line in path.read_text(errors="replace").splitlines():
        try:
            keep_it = int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep_it = False
        (keep if keep_it else drop).append(line)
    if not drop:
        return
    aside.mkdir(parents=True, exist_ok=True)
    with open(aside / METRICS, "a") as f:
        f.write("\n".join(drop) + "\n")
    write_atomic(path, "".join(line + "\n" for line in keep))
