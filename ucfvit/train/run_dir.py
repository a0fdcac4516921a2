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
taken by every rank of the job (ranks agree on a job id from the launcher's environment), and
after all ranks have decided, rank 0 carries the plan out with :func:`prepare_run_dir`.
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

from .atomic import write_atomic
from .checkpoint import checkpoint_step, find_checkpoint

__all__ = ["RunDirPlan", "RunLock", "inspect_run_dir", "prepare_run_dir", "job_id"]

LOCK, METRICS, CONFIG, ABANDONED = ".lock", "metrics.jsonl", "config.json", "abandoned"
# A lock whose holder cannot be checked by pid (another host) is stale when its heartbeat is older.
HEARTBEAT_S, STALE_AFTER_S = 30.0, 300.0
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


@dataclass
class _Holder:
    job: str
    host: str
    pid: int
    age_s: float
    slurm_job: str | None = None
    slurm_restart: int = 0

    def is_stale(self) -> bool:
        if self.job == job_id():
            return False
        mine = os.environ.get("SLURM_JOB_ID")
        if mine is not None and self.slurm_job == mine and self.slurm_restart < _slurm_restart():
            return True  # an earlier incarnation of this requeued SLURM job: it is gone
        if self.host == socket.gethostname():
            return not _alive(self.pid)
        return self.age_s > STALE_AFTER_S

    def __str__(self) -> str:
        return f"job {self.job} (pid {self.pid} on {self.host}, last heartbeat {self.age_s:.0f} s ago)"


def _read_lock(path: Path) -> _Holder | None:
    try:
        record = json.loads(path.read_text())
        age = time.time() - path.stat().st_mtime
        return _Holder(
            str(record["job"]),
            str(record["host"]),
            int(record["pid"]),
            age,
            record.get("slurm_job"),
            int(record.get("slurm_restart", 0)),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return _Holder("unreadable", "?", -1, time.time() - path.stat().st_mtime)


class RunLock:
    """``<run.dir>/.lock``: refuses a second job on one run directory; a lock left by a dead job
    (its pid gone on this host, or no heartbeat for ``STALE_AFTER_S`` from another host) is taken over."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def check(run_dir: Path) -> None:
        """Raise if a live job other than this one holds ``run_dir`` (read-only)."""
        holder = _read_lock(Path(run_dir) / LOCK)
        if holder is not None and holder.job != job_id() and not holder.is_stale():
            raise ValueError(
                f"--run.dir={run_dir} is in use by {holder}: wait for it to finish, or choose another --run.dir"
            )

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
                if not holder.is_stale():
                    raise ValueError(
                        f"--run.dir={self.path.parent} is in use by {holder}: wait for it to finish, "
                        "or choose another --run.dir"
                    ) from None
                # Stale: exactly one contender renames it away; everyone then retries the link.
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self.path, tmp.with_name(tmp.name + ".stale"))
                    os.unlink(tmp.with_name(tmp.name + ".stale"))
            finally:
                tmp.unlink(missing_ok=True)
        raise ValueError(f"--run.dir={self.path.parent}: could not take {self.path} (contended); try again")

    def start_heartbeat(self) -> None:
        """Touch the lock every ``HEARTBEAT_S`` so other hosts can tell this job is alive (rank 0)."""

        def beat():
            while not self._stop.wait(HEARTBEAT_S):
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        self._thread = threading.Thread(target=beat, name="ucfvit-run-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if this job holds it."""
        self._stop.set()
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


def inspect_run_dir(run_dir: Path, resume: str, overwrite: bool) -> RunDirPlan:
    """Decide (read-only) what this run does with ``run_dir`` given ``--checkpoint.resume`` and
    ``--run.overwrite``; raise a ``ValueError`` naming the option to change if it must not start."""
    run_dir = Path(run_dir).resolve()
    _check_types(run_dir)
    RunLock.check(run_dir)
    ckpt_root = run_dir / "checkpoints"
    entries = _step_entries(ckpt_root)
    stale = [p for p in entries if p.name.endswith(".tmp")]
    steps = [p for p in entries if not p.name.endswith(".tmp")]
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
        return RunDirPlan(run_dir, ckpt, "overwrite", checkpoint_step(ckpt) if ckpt else 0, [], stale)
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
        return RunDirPlan(run_dir, None, "fresh", 0, [], stale)
    step = checkpoint_step(ckpt)
    later = [p for p in steps if checkpoint_step(p) > step] if inside else []
    return RunDirPlan(run_dir, ckpt, "branch" if later else "continue", step, later, stale)


def prepare_run_dir(plan: RunDirPlan, config: dict) -> None:
    """Carry out ``plan`` (rank 0 only, after every rank ran :func:`inspect_run_dir`): clean stale
    ``step-N.tmp`` directories, move an abandoned branch aside, cut ``metrics.jsonl`` back to the
    resumed step (dropped lines move aside too), and write ``config.json``."""
    run_dir, ckpt_root = plan.path, plan.path / "checkpoints"
    run_dir.mkdir(parents=True, exist_ok=True)
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
