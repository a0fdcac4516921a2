"""Launching in one process: SLURM's variables mapped to torchrun's (ucfvit.parallel.launcher_env),
the world size and local GPU they give, and the container files that install the checkout with CI's
torch. The trainer started from SLURM's variables and the launchers in launch/:
tests/e2e/test_launch.py."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import torch

from ucfvit.parallel import mesh as mesh_module
from ucfvit.parallel.launcher_env import apply_slurm_env, slurm_env, tasks_on_node

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ------------------------------------------------------------------------------------------------
# SLURM variables -> env://


@pytest.fixture(autouse=True)
def _restore_environ():
    """apply_slurm_env writes RANK, WORLD_SIZE, ... into os.environ; monkeypatch.delenv of a variable that
    was absent does not undo that, and later tests in this process would think they are rank 9 of 16."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


SRUN_TASK = {
    "SLURM_PROCID": "9",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "16",
    "SLURM_NODEID": "1",
    "MASTER_ADDR": "frontier00001",
    "MASTER_PORT": "13456",
}


@pytest.mark.parametrize(
    ("tasks", "node", "expected"),
    [("2", 0, 2), ("8", 5, 8), ("8(x2)", 1, 8), ("8,4", 1, 4), ("8(x2),4", 2, 4), ("8(x2),4", 0, 8), ("3(x1)", 0, 3)],
)
def test_tasks_on_node(tasks, node, expected):
    assert tasks_on_node(tasks, node) == expected


@pytest.mark.parametrize(
    ("tasks", "node", "message"), [("8(2)", 0, "SLURM_TASKS_PER_NODE='8(2)'"), ("8,4", 2, "SLURM_NODEID=2")]
)
def test_tasks_on_node_errors(tasks, node, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tasks_on_node(tasks, node)


@pytest.mark.parametrize(
    ("tasks_vars", "local_world"),
    [
        ({"SLURM_NTASKS_PER_NODE": "8"}, "8"),
        ({"SLURM_TASKS_PER_NODE": "8(x2)"}, "8"),
        ({"SLURM_STEP_TASKS_PER_NODE": "12,4", "SLURM_TASKS_PER_NODE": "8(x2)"}, "4"),  # the step's own layout wins
        ({"SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_NTASKS_PER_NODE": "4"}, "8"),
    ],
)
def test_slurm_env_mapping(tasks_vars, local_world):
    assert slurm_env({**SRUN_TASK, **tasks_vars}) == {
        "RANK": "9",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "16",
        "LOCAL_WORLD_SIZE": local_world,
    }


def test_rank_wins_over_slurm():
    """torchrun inside SLURM (the DGX launcher): RANK is set, SLURM_* are ignored, nothing changes."""
    env = {**SRUN_TASK, "SLURM_NTASKS_PER_NODE": "8", "RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3"}
    assert slurm_env(env) == {}
    before = dict(env)
    apply_slurm_env(env)
    assert env == before


def test_world_of_one_needs_no_master():
    """``srun -n1 python recipes/train.py``: the one-process path, no MASTER_ADDR needed."""
    assert slurm_env({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1", "SLURM_NODEID": "0"}) == {}
    assert slurm_env({}) == {}


@pytest.mark.parametrize("missing", [("MASTER_ADDR",), ("MASTER_PORT",), ("MASTER_ADDR", "MASTER_PORT")])
def test_missing_master_is_an_error(missing):
    env = {k: v for k, v in {**SRUN_TASK, "SLURM_NTASKS_PER_NODE": "8"}.items() if k not in missing}
    with pytest.raises(ValueError, match=" and ".join(missing)) as err:
        slurm_env(env)
    assert "launch/frontier/train.sbatch" in str(err.value) and "rank 9 of 16" in str(err.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"SLURM_NTASKS_PER_NODE": None}, "SLURM_STEP_TASKS_PER_NODE, SLURM_NTASKS_PER_NODE, SLURM_TASKS_PER_NODE"),
        ({"SLURM_LOCALID": "8"}, "SLURM_LOCALID=8"),
        ({"SLURM_PROCID": "x"}, "SLURM_PROCID='x'"),
        ({"SLURM_NTASKS_PER_NODE": "8(x"}, "SLURM_NTASKS_PER_NODE='8(x'"),
    ],
)
def test_inconsistent_slurm_variables(change, message):
    env = {**SRUN_TASK, "SLURM_NTASKS_PER_NODE": "8", **change}
    with pytest.raises(ValueError, match=re.escape(message)):
        slurm_env({k: v for k, v in env.items() if v is not None})


def test_world_size_reads_slurm(monkeypatch):
    """mesh.world_size() (the first read of the world, before any collective) translates SLURM_* into os.environ."""
    for name in (*TORCHRUN_VARS, "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {**SRUN_TASK, "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}.items():
        monkeypatch.setenv(name, value)
    assert mesh_module.world_size() == 16
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"]) == ("9", "1", "8")


@pytest.mark.parametrize(
    ("count", "torchrun", "expected"),
    [(1, False, 0), (8, False, 3), (8, True, 3), (1, True, None), (0, False, None), (4, False, 3 % 4)],
)
def test_local_gpu(monkeypatch, count, torchrun, expected):
    """An srun task bound to its own GPU (``--gpus-per-task=1``) sees it as device 0; under torchrun a
    node that shows fewer GPUs than ranks means CPU, as before."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    for name in (*TORCHRUN_VARS, "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    env = {**SRUN_TASK, "SLURM_LOCALID": "3", "SLURM_NTASKS_PER_NODE": "8"}
    if torchrun:
        env.update(RANK="3", LOCAL_RANK="3", WORLD_SIZE="16", LOCAL_WORLD_SIZE="8", TORCHELASTIC_RUN_ID="x")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert mesh_module._local_gpu() == expected
    assert mesh_module.mesh_device_type() == ("cpu" if expected is None else "cuda")


# ------------------------------------------------------------------------------------------------
# containers/


def _torch_pins(text: str) -> set[str]:
    return set(re.findall(r"torch==([0-9][0-9.]*)", text))


def test_containers_install_the_checkout_and_pin_ci_torch():
    ci = _torch_pins((ROOT / ".ci" / "run").read_text())
    assert len(ci) == 1
    docker = (ROOT / "containers" / "Dockerfile").read_text()
    apptainer = (ROOT / "containers" / "ucfvit-rocm.def").read_text()
    assert _torch_pins(docker) == ci and _torch_pins(apptainer) == ci

    lines = re.sub(r"\\\n", " ", docker).splitlines()
    instructions = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert instructions[0].startswith("FROM ")
    assert "COPY . /opt/ucfvit" in instructions
    installs = [i for i in instructions if "pip install" in i]
    assert any(re.search(r'-e "/opt/ucfvit', i) for i in installs)
    install = next(i for i, x in enumerate(instructions) if "/opt/ucfvit" in x and "pip" in x)
    assert instructions.index("COPY . /opt/ucfvit") < install
    sections = dict(re.findall(r"^%(\w+)\n(.*?)(?=^%|\Z)", apptainer, flags=re.S | re.M))
    assert re.search(r"^From: rocm/pytorch:", apptainer, flags=re.M) and "Bootstrap: docker" in apptainer
    copied = {line.split()[0] for line in sections["files"].strip().splitlines()}
    assert {"pyproject.toml", "ucfvit", "recipes"} <= copied and not copied & {".", ".venv", ".git", "runs"}
    assert "-e /opt/ucfvit" in sections["post"] and "MIOPEN_USER_DB_PATH" in sections["environment"]
    assert "recipes/train.py" in sections["runscript"]
    # ucfvit itself never comes from an index: every "pip install" names the checkout or only torch
    for line in [*installs, *(x for x in sections["post"].splitlines() if "pip install" in x)]:
        words = shlex.split(line.split("pip install", 1)[1].split("&&")[0])
        names = [w for w in words if not w.startswith("-")]
        names = [n for n in names if not n.startswith(("http", "$", "{{", "/opt/ucfvit"))]
        assert all(n.startswith("torch==") for n in names), line

    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored)
