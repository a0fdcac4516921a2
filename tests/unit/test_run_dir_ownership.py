"""A run directory owns what it writes: links leading out of it are refused, the plan that writes is
made under the lock, a checkpoint's recorded step is its truth, stale locks are recognised, and
the pointer and lock files are read within bounds. In-process, on hand-made checkpoint directories."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ucfvit.train import trainer as trainer_module
from ucfvit.train.checkpoint import Checkpointer, CheckpointError, find_checkpoint
from ucfvit.train.config import ConfigError
from ucfvit.train.manifest import (
    CONFIG_FILE,
    MANIFEST,
    MANIFEST_FORMAT,
    METADATA,
    OPTIM_FILE,
    STATE_FILE,
    file_entries,
    read_json,
)
from ucfvit.train.run_dir import LOCK, RunLock, inspect_run_dir, job_id, prepare_run_dir

GIB = 1 << 30


def make_checkpoint(run: Path, name: str, step: object) -> Path:
    """A structurally sound checkpoint ``run/checkpoints/name`` recording ``step`` (no tensors)."""
    ckpt = run / "checkpoints" / name
    ckpt.mkdir(parents=True)
    (ckpt / METADATA).write_bytes(b"metadata")
    (ckpt / CONFIG_FILE).write_text("{}")
    (ckpt / STATE_FILE).write_text(json.dumps({"step": step}))
    (ckpt / OPTIM_FILE).write_text('{"param_groups": []}')
    files = file_entries(ckpt, [METADATA, CONFIG_FILE, STATE_FILE, OPTIM_FILE])
    (ckpt / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files}))
    return ckpt


def make_run(run: Path, steps: list[int]) -> Path:
    for step in steps:
        make_checkpoint(run, f"step-{step:08d}", step)
    (run / "checkpoints" / "latest").write_text(f"step-{steps[-1]:08d}")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in steps))
    (run / "config.json").write_text("{}")
    return run


def digest(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- links out of the run dir


@pytest.mark.parametrize(("resume", "overwrite"), [("none", True), ("auto", False)])
def test_checkpoints_linked_into_another_run_are_refused_before_anything_is_written(tmp_path, resume, overwrite):
    other = make_run(tmp_path / "A", [1, 2, 3])
    before = digest(other)
    mine = tmp_path / "B"
    mine.mkdir()
    (mine / "checkpoints").symlink_to(other / "checkpoints")
    with pytest.raises(ValueError, match=r"B/checkpoints leads to .*A/checkpoints, outside the run directory") as err:
        inspect_run_dir(mine, resume, overwrite)
    assert "\n" not in str(err.value) and "choose another --run.dir" in str(err.value)
    assert digest(other) == before
    assert sorted(p.name for p in mine.iterdir()) == ["checkpoints"]


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.json", ".lock", "abandoned", "model.safetensors"])
def test_any_entry_the_run_writes_may_not_lead_out_of_it(tmp_path, name):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    mine = tmp_path / "B"
    mine.mkdir()
    (mine / name).symlink_to(outside / name)
    with pytest.raises(ValueError, match=rf"B/{name} leads to .*elsewhere/{name}, outside"):
        inspect_run_dir(mine, "none", False)


def test_the_writers_refuse_a_link_that_appeared_after_inspection(tmp_path):
    other = make_run(tmp_path / "A", [1, 2, 3])
    before = digest(other)
    mine = tmp_path / "B"
    plan = inspect_run_dir(mine, "none", True)
    mine.mkdir()
    (mine / "checkpoints").symlink_to(other / "checkpoints")
    with pytest.raises(ValueError, match="outside the run directory"):
        prepare_run_dir(plan, {})
    with pytest.raises(CheckpointError, match="outside the run directory"):
        Checkpointer(mine, keep=1)._prune()
    assert digest(other) == before


# --------------------------------------------------------------------------- the plan is made under the lock


def test_the_plan_that_writes_is_made_again_under_the_lock(tmp_path, monkeypatch):
    """A job plans a new run, then (reading a slow --init.from) another job trains in the same
    directory and finishes: the first job, once it holds the lock, refuses instead of overwriting."""
    run = tmp_path / "run"
    cfg = SimpleNamespace(
        checkpoint=SimpleNamespace(resume="auto"), run=SimpleNamespace(overwrite=False, collective_timeout=60)
    )

    def slow_validate(_cfg):
        plan = SimpleNamespace(cfg=cfg, run=inspect_run_dir(run, "auto", False))
        plan.run_dir = plan.run.path
        assert plan.run.action == "fresh" and plan.run.checkpoint is None
        make_run(run, [1, 2])  # the other job, start to finish
        return plan

    started = []
    monkeypatch.setattr(trainer_module, "validate_config", slow_validate)
    monkeypatch.setattr(trainer_module, "_train", lambda *args: started.append(args))
    before = digest(run) if run.exists() else None
    with pytest.raises(ConfigError, match=r"changed while this job was starting .*run the command again"):
        trainer_module.train(cfg)
    assert started == [] and before is None
    assert digest(run) == digest(make_run(tmp_path / "same", [1, 2]))  # untouched, and the lock released
    assert not (run / LOCK).exists()


# --------------------------------------------------------------------------- the recorded step is the truth


def test_a_renamed_checkpoint_is_refused_and_nothing_moves(tmp_path):
    run = make_run(tmp_path / "run", [1, 2, 3])
    os.rename(run / "checkpoints" / "step-00000001", run / "checkpoints" / "step-00000009")
    (run / "checkpoints" / "latest").write_text("step-00000009")
    before = digest(run)
    with pytest.raises(CheckpointError, match=r"step-00000009 is named step 9 but records step 1") as err:
        inspect_run_dir(run, "auto", False)
    assert "\n" not in str(err.value)
    (run / "checkpoints" / "latest").write_text("step-00000003")  # latest fine: a renamed sibling still is not
    with pytest.raises(CheckpointError, match=r"step-00000009 is named step 9 but records step 1"):
        inspect_run_dir(run, "auto", False)
    (run / "checkpoints" / "latest").write_text("step-00000009")
    assert digest(run) == before


def test_a_step_linked_to_another_step_is_refused(tmp_path):
    run = make_run(tmp_path / "run", [1, 2])
    (run / "checkpoints" / "step-00000009").symlink_to("step-00000001")
    with pytest.raises(CheckpointError, match=r"step-00000009 is a link to .*step-00000001: refusing to follow"):
        inspect_run_dir(run, "auto", False)
    (run / "checkpoints" / "latest").write_text("step-00000009")
    with pytest.raises(CheckpointError, match=r"step-00000009 is a link to"):
        find_checkpoint(run)


@pytest.mark.parametrize("step", [-2, "3", 1.0, None])
def test_a_checkpoint_recording_no_valid_step_is_refused(tmp_path, step):
    ckpt = make_checkpoint(tmp_path / "run", "step-00000001", step)
    with pytest.raises(CheckpointError, match=rf"step-00000001 records step {step!r} in its trainer_state.json"):
        inspect_run_dir(tmp_path / "run", "auto", False)
    with pytest.raises(CheckpointError, match="not a step number"):
        find_checkpoint(ckpt)  # named with --checkpoint.resume PATH


def test_no_checkpoint_is_saved_at_a_negative_step(tmp_path):
    with pytest.raises(CheckpointError, match="refusing to save a checkpoint at step -1"):
        Checkpointer(tmp_path, keep=2).save(-1, None, None, {}, {})
    assert not (tmp_path / "checkpoints").exists()


# --------------------------------------------------------------------------- stale locks


def write_lock(run: Path, mtime: float | None = None, **record) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    path = run / LOCK
    path.write_text(json.dumps({"job": "proc:elsewhere:1", "host": "elsewhere", "pid": 1, **record}))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_a_lock_dated_far_in_the_future_is_stale(tmp_path, capsys):
    write_lock(tmp_path, mtime=time.time() + 86400)
    RunLock(tmp_path).acquire().release()
    assert "in the future" in capsys.readouterr().out
    write_lock(tmp_path, mtime=time.time() + 60)  # a clock a minute off: still live
    with pytest.raises(ValueError, match=r"believed live because its heartbeat is 0 s old"):
        RunLock(tmp_path).acquire()


def test_a_lock_whose_pid_now_belongs_to_another_process_is_stale(tmp_path, capsys):
    here = socket.gethostname()
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    write_lock(tmp_path, job=f"proc:{here}:{os.getpid()}0", host=here, pid=os.getpid(), start="1", boot=boot)
    lock = RunLock(tmp_path).acquire()
    assert "another process" in capsys.readouterr().out
    record = json.loads((tmp_path / LOCK).read_text())
    assert record["job"] == job_id() and record["start"] is not None and record["boot"] == boot
    lock.release()


def test_a_live_lock_says_why_it_is_believed_live_and_what_to_do(tmp_path):
    here = socket.gethostname()
    write_lock(tmp_path, job=f"proc:{here}:{os.getppid()}", host=here, pid=os.getppid())  # an old lock: no start
    for attempt in (lambda: RunLock(tmp_path).acquire(), lambda: inspect_run_dir(tmp_path, "auto", False)):
        with pytest.raises(ValueError) as err:
            attempt()
        message = str(err.value)
        assert f"believed live because process {os.getppid()} runs on this host" in message
        assert f"wait for it to finish; if that job is gone, delete {tmp_path / LOCK}" in message
        assert "choose another --run.dir" in message


def test_a_lock_that_is_gone_or_taken_is_noticed(tmp_path):
    lock = RunLock(tmp_path).acquire()
    assert lock.lost() is None
    (tmp_path / LOCK).unlink()
    assert lock.lost() == f"{tmp_path / LOCK} is gone"
    write_lock(tmp_path)
    assert "now names job proc:elsewhere:1" in lock.lost()


# --------------------------------------------------------------------------- bounded reads


def test_a_huge_sparse_latest_or_lock_is_refused_unread(tmp_path):
    run = make_run(tmp_path / "run", [1])
    os.truncate(run / "checkpoints" / "latest", 3 * GIB)
    with pytest.raises(CheckpointError, match=r"latest: the pointer to the newest checkpoint holds 3072 MiB"):
        find_checkpoint(run)
    (run / "checkpoints" / "latest").write_text("step-00000001")
    os.truncate(write_lock(run), 3 * GIB)
    with pytest.raises(ValueError, match=rf"{LOCK}: the run lock holds 3072 MiB.*delete {run / LOCK}"):
        inspect_run_dir(run, "auto", False)
    os.truncate(run / "checkpoints" / "step-00000001" / STATE_FILE, 3 * GIB)
    with pytest.raises(CheckpointError, match="trainer_state.json: a checkpoint's JSON file holds 3072 MiB"):
        read_json(run / "checkpoints" / "step-00000001" / STATE_FILE)


def test_a_fifo_latest_is_refused_without_blocking(tmp_path):
    run = make_run(tmp_path / "run", [1])
    (run / "checkpoints" / "latest").unlink()
    os.mkfifo(run / "checkpoints" / "latest")
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(_error_of(find_checkpoint, run)), daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # unblock the reader so the test process can end
        with open(run / "checkpoints" / "latest", "w"):
            pass
        pytest.fail("reading a FIFO latest blocked")
    assert "must be a regular file, but this is a FIFO" in outcome[0]


def _error_of(fn, *args) -> str:
    try:
        return f"returned {fn(*args)}"
    except ValueError as err:
        return str(err)
