"""Runs cannot eat each other (used run dirs, branches, locks, stale saves, metrics after a resume)
and training notices when it diverges. Each case runs the real trainer on one tiny CPU rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_runs
from rank_runner import run_ranks
from ucfvit.train.checkpoint import find_checkpoint
from ucfvit.train.cli import parse
from ucfvit.train.plan import validate_config
from ucfvit.train.run_dir import LOCK

ROOT = Path(__file__).parents[2]
TINY = ["--arch.img-size", "16", "16", "--data.global-batch-size", "4", "--metrics.log-every", "1"]


def recipe(argv: list[str], model: str = "vit", **kw) -> subprocess.CompletedProcess:
    """``python recipes/train.py --model MODEL ...`` on one CPU process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "recipes" / "train.py"), "--model", model, *TINY, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, **kw)


def train(run_dir: Path, argv: list[str]) -> dict:
    return run_ranks(1, train_runs.run, "vit", [*TINY, "--run.dir", str(run_dir), *argv])[0]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def logged_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_fresh_run_into_a_used_run_dir_is_refused_and_overwrite_replaces_it(tmp_path):
    run = tmp_path / "run"
    train(run, ["--max-steps", "2", "--checkpoint.every", "1"])
    before = snapshot(run / "checkpoints")
    out = recipe(["--checkpoint.resume", "none", "--max-steps", "3", "--run.dir", str(run)])
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    msg = out.stderr.strip().splitlines()[-1]
    for hint in (
        "already holds a run",
        "checkpoints up to step 2",
        "--checkpoint.resume auto",
        "--run.dir",
        "--run.overwrite",
    ):
        assert hint in msg, msg
    assert snapshot(run / "checkpoints") == before  # nothing touched

    # Only metrics (a run that died before its first checkpoint) also counts as a used directory.
    only_metrics = tmp_path / "metrics-only"
    only_metrics.mkdir()
    (only_metrics / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="already holds a run"):
        validate_config(parse(["--model", "vit", "--checkpoint.resume", "none", "--run.dir", str(only_metrics)]))

    out = train(run, ["--checkpoint.resume", "none", "--run.overwrite", "--max-steps", "1"])
    assert out["steps"] == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000001"]
    assert logged_steps(run / "metrics.jsonl") == [1]


def test_resume_by_path_from_an_older_step_moves_the_later_branch_aside(tmp_path):
    run = tmp_path / "run"
    train(run, ["--max-steps", "6", "--checkpoint.every", "2", "--checkpoint.keep", "3"])
    old_step4 = snapshot(run / "checkpoints" / "step-00000004")
    chosen = run / "checkpoints" / "step-00000002"
    branch = ["--max-steps", "5", "--checkpoint.every", "1", "--checkpoint.keep", "2"]
    out = train(run, [*branch, "--checkpoint.resume", str(chosen)])
    assert out["steps"] == 5
    # The chosen checkpoint survives its own resume, also when this run's own saves (3, 4, 5) exceed
    # --checkpoint.keep (before: the old branch's higher steps won the pruning, deleting it and the
    # new step-3), and the new branch continues from it.
    listing = ["latest", "step-00000002", "step-00000004", "step-00000005"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == listing
    (aside,) = (run / "abandoned").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "step-00000004", "step-00000006"]
    assert snapshot(aside / "step-00000004") == old_step4  # moved, not changed
    assert logged_steps(run / "metrics.jsonl") == [1, 2, 3, 4, 5]  # no step twice
    assert logged_steps(aside / "metrics.jsonl") == [3, 4, 5, 6]
    # auto continues the new branch
    assert train(run, ["--max-steps", "6"])["steps"] == 6
    assert logged_steps(run / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]


def test_second_concurrent_run_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    argv = ["--model", "vit", *TINY, "--max-steps", "100000", "--checkpoint.every", "2", "--run.dir", str(run)]
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "recipes" / "train.py"), *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while find_checkpoint(run) is None and time.time() < deadline and first.poll() is None:
            time.sleep(0.1)
        assert first.poll() is None and find_checkpoint(run) is not None
        for resume in ("auto", "none"):
            out = recipe(["--max-steps", "3", "--checkpoint.resume", resume, "--run.dir", str(run)])
            assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
            assert f"--run.dir={run} is in use by" in out.stderr and f"pid {first.pid}" in out.stderr, out.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # The dead run's lock (its pid is gone) does not block the next run, which continues it.
    assert json.loads((run / LOCK).read_text())["pid"] == first.pid
    step = int(find_checkpoint(run).name.split("-")[1])
    assert train(run, ["--max-steps", str(step + 1)])["steps"] == step + 1
    assert not (run / LOCK).exists()  # released at the end


def taken_mid_run(run_dir: str, argv: list[str]) -> str:
    """Train; after step 2 the run directory is deleted and another job starts there (its lock and
    its first metrics line). Returns the error the run ends with."""
    import shutil

    from ucfvit.train.hooks import Hooks
    from ucfvit.train.trainer import train as train_in_process

    class TakeOver(Hooks):
        def on_step_end(self, step, record):
            if step == 2:
                shutil.rmtree(run_dir)
                os.makedirs(run_dir)
                Path(run_dir, LOCK).write_text('{"job": "proc:elsewhere:1", "host": "elsewhere", "pid": 1}')
                Path(run_dir, "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')

    try:
        train_in_process(train_runs.config("vit", [*TINY, "--run.dir", run_dir, *argv]), hooks=[TakeOver()])
    except ValueError as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def test_a_run_whose_directory_was_taken_over_stops_without_writing_there(tmp_path):
    run = tmp_path / "run"
    got = run_ranks(1, taken_mid_run, str(run), ["--max-steps", "4", "--checkpoint.every", "3"])[0]
    assert got.startswith(f"ConfigError: --run.dir={run}: its .lock no longer names this job"), got
    assert "stopped at step 3 without saving" in got and "\n" not in got
    assert sorted(p.name for p in run.iterdir()) == [".lock", "metrics.jsonl"]  # the other job's, untouched
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n'


def test_stale_tmp_is_cleaned_and_wrong_file_types_are_refused_at_start(tmp_path):
    run = tmp_path / "run"
    train(run, ["--max-steps", "1"])
    stale = run / "checkpoints" / "step-00000009.tmp"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"half written")
    assert train(run, ["--max-steps", "2"])["steps"] == 2
    assert not stale.exists()

    bad = tmp_path / "bad"
    (bad / "metrics.jsonl").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"metrics.jsonl exists and is not a file"):
        validate_config(parse(["--model", "vit", "--run.dir", str(bad)]))
    bad2 = tmp_path / "bad2"
    bad2.mkdir()
    (bad2 / "checkpoints").write_text("")
    with pytest.raises(ValueError, match=r"checkpoints exists and is not a directory"):
        validate_config(parse(["--model", "vit", "--run.dir", str(bad2)]))
    assert not (tmp_path / "never").exists()
    validate_config(parse(["--model", "vit", "--run.dir", str(tmp_path / "never")]))
    assert not (tmp_path / "never").exists()  # validation creates nothing


def test_same_command_twice_continues_and_says_so_and_still_exports(tmp_path):
    argv = ["--max-steps", "2", "--run.dir", str(tmp_path / "run")]
    first = recipe(argv)
    assert first.returncode == 0, first.stderr
    assert "new run" in first.stdout
    second = recipe([*argv, "--checkpoint.export-safetensors"])
    assert second.returncode == 0, second.stderr
    assert "continuing from" in second.stdout and "nothing to train" in second.stdout, second.stdout
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert logged_steps(tmp_path / "run" / "metrics.jsonl") == [1, 2]


def _finite_model(ckpt: Path) -> bool:
    """Load a checkpoint's model tensors (our own, trusted test output) and check they are finite."""
    import torch.distributed.checkpoint as dcp

    from ucfvit.models import build_model

    model = build_model("vit", "debug", img_size=(16, 16), num_classes=3)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    return all(torch.isfinite(t).all() for t in state["model"].values())


@pytest.mark.parametrize("skip", [0, 2])
def test_divergence_stops_without_saving_a_non_finite_checkpoint(tmp_path, skip):
    run = tmp_path / "run"
    diverging = ["--optim.lr", "1e6", "--max-steps", "30", "--checkpoint.every", "1"]
    out = recipe([*diverging, "--optim.skip-nonfinite", str(skip), "--run.dir", str(run)])
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    msg = out.stderr.strip().splitlines()[-1]
    assert "diverged" in msg and "non-finite" in msg and "--optim.lr" in msg, msg
    if skip:
        assert out.stdout.count("update skipped") == skip
    last = find_checkpoint(run)
    assert last is not None and str(last) in msg  # the message names the checkpoint that is kept
    assert _finite_model(last)
