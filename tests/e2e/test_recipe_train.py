"""recipes/train.py under torchrun: the README command, exact resume after SIGKILL, and SIGTERM
(preemption) on one rank. Resharding a checkpoint onto other meshes: tests/distributed/test_train.py."""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import train_runs
from rank_runner import run_ranks
from torchrun_jobs import children, kill_all, torchrun, wait
from train_runs import losses
from ucfvit.train.checkpoint import find_checkpoint

ROOT = Path(__file__).parents[2]


def readme_main_command() -> tuple[int, list[str]]:
    """(processes, arguments of recipes/train.py) of the README's main command: the torchrun at the
    end of its set-up line."""
    for line in (ROOT / "README.md").read_text().splitlines():
        words = shlex.split(line) if line.startswith("python3 -m venv ") else []
        if "torchrun" in words:
            run = words[words.index("torchrun") :]
            assert run[:3] == ["torchrun", "--standalone", "--nproc_per_node"] and run[4] == "recipes/train.py", run
            return int(run[3]), run[5:]
    raise AssertionError("README.md has no set-up line that ends with the torchrun of the main command")


def test_readme_main_command(tmp_path):
    """The README's main command on CPU (today `torchrun --standalone --nproc_per_node 8 recipes/train.py
    --model mae --mesh 2x2x2`), with this test's own run directory."""
    nproc, argv = readme_main_command()
    assert (nproc, argv) == (8, ["--model", "mae", "--mesh", "2x2x2"]), "update this test's checks with the command"
    log = tmp_path / "log.txt"
    text = wait(torchrun(nproc, [*argv, "--run.dir", str(tmp_path / "run")], log), log)
    assert "step     60/60" in text, text[-3000:]
    assert "mae/debug on mesh 2x2x2 (cpu)" in text  # the resolved run is printed (its whole config with --verbose)
    run = tmp_path / "run"
    logged = [v[0] for _, v in sorted(losses(run).items())]
    assert len(logged) >= 20
    assert sum(logged[-10:]) / 10 < sum(logged[:10]) / 10
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"] == "mae" and saved["mesh"] == "2x2x2"
    assert find_checkpoint(run).name == "step-00000060"


def test_resume_after_sigkill_is_exact(tmp_path):
    n = 6
    argv = [
        *["--model", "mae", "--mesh", "1x2x1", "--metrics.log-every", "1", "--checkpoint.export-safetensors"],
        *["--arch.drop-path-rate", "0.1", "--max-steps", "30"],
    ]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_log = tmp_path / "ref.txt"
    wait(torchrun(2, [*argv, "--run.dir", str(ref_dir)], ref_log), ref_log)

    log = tmp_path / "run.txt"
    proc = torchrun(2, [*argv, "--checkpoint.every", str(n), "--run.dir", str(run_dir)], log)
    deadline = time.time() + 300
    while find_checkpoint(run_dir) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.5))
    kill_all(proc)
    killed_at = find_checkpoint(run_dir)
    assert killed_at is not None and int(killed_at.name.split("-")[1]) < 30, "the run must die before its end"
    assert not (run_dir / "model.safetensors").exists()
    log2 = tmp_path / "resume.txt"
    text = wait(
        torchrun(
            2, [*argv, "--checkpoint.every", str(n), "--checkpoint.resume", "auto", "--run.dir", str(run_dir)], log2
        ),
        log2,
    )
    assert f"resumed from {killed_at}" in text

    ref, run = losses(ref_dir), losses(run_dir)
    assert sorted(run) == sorted(ref) == list(range(1, 31))
    for step, values in run.items():
        assert len(values) == 1, f"step {step} logged {len(values)} times after the resume"
        assert abs(values[0] - ref[step][0]) <= 1e-6, (step, values[0], ref[step][0])
    a, b = load_file(str(ref_dir / "model.safetensors")), load_file(str(run_dir / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k


def test_sigterm_on_one_rank_saves_an_agreed_checkpoint_and_exits_cleanly(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    argv = [
        *["--model", "vit", "--mesh", "1x1x2", "--max-steps", "100000", "--metrics.log-every", "1"],
        *["--run.dir", str(run_dir)],
    ]
    proc = torchrun(2, argv, log)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGTERM)  # one rank only, as a preempted node would see
    text = wait(proc, log, timeout=200)
    assert proc.returncode == 0, text[-3000:]
    ckpt = find_checkpoint(run_dir)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert f"stop requested: saved step {state['step']}" in text
    assert 3 <= state["step"] < 100000 and state["data_positions"] == {"synthetic": state["step"] * 16}
    resume = [
        *argv[:4],
        "--max-steps",
        str(state["step"] + 1),
        "--checkpoint.resume",
        "auto",
        "--run.dir",
        str(run_dir),
    ]
    out = run_ranks(2, train_runs.run, "vit", resume)[0]
    assert out["steps"] == state["step"] + 1
