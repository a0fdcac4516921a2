"""End-to-end runs of recipes/train.py under torchrun: the README command, exact resume after
SIGKILL, resharding a checkpoint onto other meshes, and SIGTERM (preemption) on one rank."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed import run_ranks
from ucfvit.train.checkpoint import find_checkpoint

ROOT = Path(__file__).parents[1]


def torchrun(nproc: int, argv: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "recipes" / "train.py"), *argv]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (which torchrun starts in sessions of their own)."""
    workers = _children(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    while any(_running(pid) for pid in workers):
        time.sleep(0.01)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait(proc: subprocess.Popen, log: Path, timeout: float = 400) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_all(proc)
        pytest.fail(f"timed out:\n{log.read_text()[-3000:]}")
    return log.read_text()


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> losses logged for it in metrics.jsonl (a resume cuts the file back to its checkpoint's
    step, so each step should appear once)."""
    out: dict[int, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.setdefault(record["step"], []).append(record["loss"])
    return out


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
    assert '"mesh": "2x2x2"' in text  # the resolved config is printed
    run = tmp_path / "run"
    logged = [v[0] for _, v in sorted(losses(run).items())]
    assert len(logged) >= 20
    assert sum(logged[-10:]) / 10 < sum(logged[:10]) / 10
    assert json.loads((run / "config.json").read_text())["model"] == "mae"
    assert find_checkpoint(run).name == "step-00000060"


def test_resume_after_sigkill_is_exact(tmp_path):
    n, argv = 6, ["--model", "mae", "--mesh", "1x2x1", "--metrics.log-every", "1", "--checkpoint.export-safetensors",
                  "--arch.drop-path-rate", "0.1", "--max-steps", "30"]  # fmt: skip
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


def test_checkpoint_reshards_onto_other_meshes(tmp_path):
    common = ["--metrics.log-every", "1", "--max-steps", "4", "--arch.drop-path-rate", "0.1"]
    src = tmp_path / "src"
    ref = run_ranks(8, "train_cases:run", "mae", [*common, "--mesh", "2x2x2", "--checkpoint.every", "3",
                                                   "--checkpoint.keep", "3", "--run.dir", str(src)])[0]  # fmt: skip
    ckpt = src / "checkpoints" / "step-00000003"
    for world, mesh in [(8, "1x4x2"), (4, "1x1x4"), (2, "2x1x1"), (1, "1x1x1")]:
        out = run_ranks(world, "train_cases:run", "mae", [*common, "--mesh", mesh, "--checkpoint.resume", str(ckpt),
                                                           "--run.dir", str(tmp_path / mesh)])[0]  # fmt: skip
        assert out["steps"] == 4
        assert abs(out["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (mesh, out["loss"], ref["loss"])


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry.name))
    return kids


def test_sigterm_on_one_rank_saves_an_agreed_checkpoint_and_exits_cleanly(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    argv = [
        "--model",
        "vit",
        "--mesh",
        "1x1x2",
        "--max-steps",
        "100000",
        "--metrics.log-every",
        "1",
        "--run.dir",
        str(run_dir),
    ]
    proc = torchrun(2, argv, log)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    workers = _children(proc.pid)
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
    out = run_ranks(2, "train_cases:run", "vit", resume)[0]
    assert out["steps"] == state["step"] + 1
