"""Launching: the trainer started by srun from SLURM's variables alone, and the launchers in launch/
(their --dry-run output, and what they run, with fake srun/torchrun/scontrol on PATH). SLURM's
variables read in one process, and the container files: tests/unit/test_launch.py."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ucfvit.train.checkpoint import find_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "recipes" / "train.py")
FRONTIER, DGX, LOCAL = (str(ROOT / "launch" / p) for p in ("frontier/train.sbatch", "dgx/train.sbatch", "local.sh"))
LAUNCHERS = [FRONTIER, DGX, LOCAL]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (the tests may run inside a SLURM job), plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "TORCHELASTIC_", "UCFVIT_")) and k not in TORCHRUN_VARS
    }
    return {**env, "OMP_NUM_THREADS": "1", **extra}


# ------------------------------------------------------------------------------------------------
# SLURM variables -> env://, in the trainer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_from_slurm_variables_alone(tmp_path):
    """Two plain ``python recipes/train.py`` processes, as ``srun -n2`` starts them: SLURM's variables and
    MASTER_ADDR/MASTER_PORT, no RANK/WORLD_SIZE/LOCAL_RANK, no torchrun. Both train to step 3 together."""
    run_dir = tmp_path / "run"
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = clean_env(
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank),
            SLURM_NTASKS="2",
            SLURM_NTASKS_PER_NODE="2",
            SLURM_NODEID="0",
            SLURM_JOB_ID="4242",
            SLURM_STEP_ID="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            CUDA_VISIBLE_DEVICES="",
            PYTHONPATH=str(ROOT),
        )
        log = open(tmp_path / f"rank{rank}.log", "w")  # noqa: SIM115 (closed below)
        cmd = [sys.executable, TRAIN, "--model", "vit", "--mesh", "2x1x1", "--max-steps", "3", "--run.dir", run_dir]
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append((proc, log))
    codes = []
    for proc, log in procs:
        try:
            codes.append(proc.wait(timeout=300))
        except subprocess.TimeoutExpired:
            for other, _ in procs:
                other.kill()
            codes.append("timeout")
        log.close()
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert codes == [0, 0], "\n".join(f"--- rank {r} ---\n{text[-3000:]}" for r, text in enumerate(logs))
    assert "vit/debug on mesh 2x1x1 (cpu)" in logs[0]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3
    assert find_checkpoint(run_dir).name == "step-00000003"


def test_trainer_without_master_addr_fails_before_any_collective(tmp_path):
    """An srun task of a 2-task step whose launcher did not export MASTER_ADDR/MASTER_PORT: one line, exit 1."""
    env = clean_env(
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_NODEID="0",
        SLURM_JOB_ID="4243",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=str(ROOT),
    )
    cmd = [sys.executable, TRAIN, "--model", "vit", "--mesh", "2x1x1", "--max-steps", "3", "--run.dir", str(tmp_path)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("recipes/train.py: error:") and "MASTER_ADDR and MASTER_PORT are not set" in last
    assert "Traceback" not in out.stderr


# ------------------------------------------------------------------------------------------------
# launch/: --dry-run output, what is run, bad input

FAKE_RECORDER = """#!/bin/bash
# records its arguments (NUL-separated) and environment, for the tests
printf '%s\\0' "$@" > "$FAKE_OUT/$(basename "$0").args"
env -0 > "$FAKE_OUT/$(basename "$0").env"
"""

# srun that also plays one task: node 1's local task 0, to run the per-task command it was given
FAKE_SRUN = (
    FAKE_RECORDER
    + """
while [[ $# -gt 0 && $1 == --* ]]; do shift; done
SLURM_NODEID=1 SLURM_LOCALID=0 SLURM_PROCID=8 exec "$@"
"""
)

FAKE_PYTHON = """#!/bin/bash
# a python that prints 4 GPUs when asked by launch/local.sh, and otherwise records its call
if [[ $1 == -c ]]; then echo 4; exit 0; fi
printf '%s\\0' "$@" > "$FAKE_OUT/python.args"
env -0 > "$FAKE_OUT/python.env"
"""

FAKE_SCONTROL = """#!/bin/bash
[[ "$1 $2" == "show hostnames" ]] || exit 1
echo "$3" > "$FAKE_OUT/scontrol.args"
printf '%s\\n' $FAKE_HOSTS
"""

ALLOCATION = {
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NODELIST": "frontier[00001-00002]",
    "SLURM_JOB_NUM_NODES": "2",
    "FAKE_HOSTS": "frontier00001 frontier00002",
}
TRAIN_ARGS = ["--model", "mae", "--mesh", "2x4x2", "--run.dir", "/scratch/my runs/mae 1", "--data.seed=3", "x y"]


@pytest.fixture
def fake(tmp_path):
    """A directory of fake srun/torchrun/scontrol/python, and where they write: (bin, out)."""
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    out.mkdir()
    fakes = {"srun": FAKE_SRUN, "torchrun": FAKE_RECORDER, "scontrol": FAKE_SCONTROL, "python": FAKE_PYTHON}
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir, out


def launch(script: str, args: list[str], fake: tuple[Path, Path], **env: str) -> subprocess.CompletedProcess:
    """Run a launcher with the fakes on PATH; a dry run checks the training options with the fake python
    (it accepts anything) unless ``UCFVIT_PYTHON`` or ``--python`` names another."""
    bin_dir, out = fake
    env.setdefault("UCFVIT_PYTHON", str(bin_dir / "python"))
    full = clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_OUT=str(out), UCFVIT_MODULES="", **env)
    full.pop("OMP_NUM_THREADS")
    return subprocess.run(["bash", script, *args], env=full, capture_output=True, text=True, timeout=60, cwd=ROOT)


def recorded(fake: tuple[Path, Path], name: str) -> tuple[list[str], dict[str, str]] | None:
    """The arguments and environment fake command ``name`` was called with, or None if it was not."""
    out = fake[1]
    if not (out / f"{name}.args").exists():
        return None
    args = (out / f"{name}.args").read_text().split("\0")[:-1]
    env = dict(item.split("=", 1) for item in (out / f"{name}.env").read_text().split("\0") if "=" in item)
    return args, env


def parse_dry_run(text: str) -> dict:
    """{"launch": argv, "nodes": [{"index", "host", "ranks", "env": {...}, "run": argv}]} from --dry-run output."""
    result: dict = {"launch": None, "nodes": []}
    node = None
    for line in text.splitlines():
        if line.startswith("launch "):
            result["launch"] = shlex.split(line[len("launch ") :])
        elif match := re.fullmatch(r"=== node (\d+): (\S+), (.+) ===", line):
            index, host, ranks = int(match.group(1)), match.group(2), match.group(3)
            node = {"index": index, "host": host, "ranks": ranks, "env": {}, "run": None}
        elif line.startswith("env ") and node is not None:
            name, value = line[len("env ") :].split("=", 1)
            assert name not in node["env"], f"{name} printed twice for node {node['index']}"
            node["env"][name] = shlex.split(value)[0] if value else ""
        elif line.startswith("run ") and node is not None:
            node["run"] = shlex.split(line[len("run ") :])
        elif line == f"=== end node {node['index'] if node else -1} ===":
            result["nodes"].append(node)
            node = None
    assert node is None, f"unterminated node block in:\n{text}"
    return result


def test_scripts_are_bash_clean():
    for script in [*LAUNCHERS, str(ROOT / "launch" / "common.sh")]:
        out = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    if shutil.which("shellcheck"):
        out = subprocess.run(["shellcheck", "-x", *LAUNCHERS], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0, out.stdout


def test_frontier_dry_run_outside_an_allocation(fake):
    """2 nodes x 8 GCDs: one srun with a task per GCD; per node the same train command and rendezvous,
    its own MIOpen directory; nothing is started."""
    out = launch(FRONTIER, ["--dry-run", "--nodes", "2", *TRAIN_ARGS], fake)
    assert out.returncode == 0, out.stderr
    plan = parse_dry_run(out.stdout)
    assert [n["host"] for n in plan["nodes"]] == ["node0", "node1"]
    assert [n["ranks"] for n in plan["nodes"]] == ["ranks 0-7", "ranks 8-15"]
    srun = plan["launch"]
    tasks = ["--nodes=2", "--ntasks=16", "--ntasks-per-node=8", "--cpus-per-task=7", "--gpus-per-task=1"]
    assert srun[:8] == ["srun", *tasks, "--gpu-bind=closest", "--kill-on-bad-exit=1"]
    assert srun[-len(TRAIN_ARGS) - 2 :] == ["python", TRAIN, *TRAIN_ARGS]
    for node in plan["nodes"]:
        assert node["run"] == ["python", TRAIN, *TRAIN_ARGS]
        env = node["env"]
        assert env["NCCL_SOCKET_IFNAME"] == "hsn0" and env["FI_CXI_ATS"] == "0" and env["OMP_NUM_THREADS"] == "7"
        assert env["NCCL_NET_GDR_LEVEL"] == "PHB" and env["FI_MR_CACHE_MONITOR"] in ("userfaultfd", "kdreg2")
        assert env["MIOPEN_CUSTOM_CACHE_DIR"] == env["MIOPEN_USER_DB_PATH"]
    assert {(n["env"]["MASTER_ADDR"], n["env"]["MASTER_PORT"]) for n in plan["nodes"]} == {("node0", "29500")}
    assert [n["env"]["MIOPEN_USER_DB_PATH"] for n in plan["nodes"]] == [
        "/tmp/ucfvit-miopen-JOBID-node0",
        "/tmp/ucfvit-miopen-JOBID-node1",
    ]
    assert recorded(fake, "srun") is None


def test_frontier_in_an_allocation(fake, tmp_path):
    """Inside a 2-node allocation: the dry run names the hosts (scontrol) and a port from the job id; the
    real run calls srun with exactly that command, and a task on node 1 gets node 1's MIOpen directory."""
    node_tmp = tmp_path / "node tmp"
    env = {**ALLOCATION, "UCFVIT_NODE_TMP": str(node_tmp), "RANK": "5", "NCCL_SOCKET_IFNAME": "hsn0,hsn1"}
    dry = launch(FRONTIER, ["--dry-run", *TRAIN_ARGS], fake, **env)
    assert dry.returncode == 0, dry.stderr
    plan = parse_dry_run(dry.stdout)
    assert [n["host"] for n in plan["nodes"]] == ["frontier00001", "frontier00002"]
    assert {(n["env"]["MASTER_ADDR"], n["env"]["MASTER_PORT"]) for n in plan["nodes"]} == {("frontier00001", "13456")}
    assert plan["nodes"][0]["env"]["NCCL_SOCKET_IFNAME"] == "hsn0,hsn1"  # the user's value wins
    assert recorded(fake, "srun") is None

    real = launch(FRONTIER, TRAIN_ARGS, fake, **env)
    assert real.returncode == 0, real.stderr
    args, srun_env = recorded(fake, "srun")
    assert args == plan["launch"][1:]
    assert srun_env["MASTER_ADDR"] == "frontier00001" and srun_env["MASTER_PORT"] == "13456"
    assert "RANK" not in srun_env  # a stale RANK would win over SLURM_PROCID in the trainer
    py_args, py_env = recorded(fake, "python")  # the task that the fake srun played: node 1
    assert py_args == [TRAIN, *TRAIN_ARGS]
    assert (
        py_env["MIOPEN_USER_DB_PATH"]
        == plan["nodes"][1]["env"]["MIOPEN_USER_DB_PATH"]
        == (f"{node_tmp}/ucfvit-miopen-123456-node1")
    )
    assert Path(py_env["MIOPEN_USER_DB_PATH"]).is_dir()
    assert "launch srun" in real.stdout  # the job log shows what ran


@pytest.mark.parametrize("script", [FRONTIER, DGX])
def test_sbatch_copy_finds_the_checkout(fake, tmp_path, script):
    """sbatch runs a copy of the script from its spool directory: the checkout is the submit directory."""
    copy = tmp_path / "spool" / "slurm_script"
    copy.parent.mkdir()
    shutil.copy(script, copy)
    args = ["--dry-run", "--image", "x", "--mesh", "1x8x1"] if script == DGX else ["--dry-run", "--mesh", "1x8x1"]
    out = launch(str(copy), args, fake, SLURM_SUBMIT_DIR=str(ROOT))
    assert out.returncode == 0, out.stderr
    assert parse_dry_run(out.stdout)["launch"][-3].endswith("recipes/train.py")
    out = launch(str(copy), args, fake)
    assert out.returncode == 2 and "cannot find the ucfvit checkout" in out.stderr


def test_frontier_fewer_nodes_than_allocated(fake):
    out = launch(FRONTIER, ["--dry-run", "--nodes", "1", "--model", "vit", "--mesh", "1x8x1"], fake, **ALLOCATION)
    assert out.returncode == 0, out.stderr
    plan = parse_dry_run(out.stdout)
    assert len(plan["nodes"]) == 1 and "--nodelist=frontier00001" in plan["launch"]


def test_frontier_python_command_of_several_words(fake):
    """--python may be a container runner: its words come before recipes/train.py."""
    cmd = "apptainer exec --rocm /images/ucfvit-rocm.sif python3"
    out = launch(FRONTIER, ["--dry-run", "--nodes", "1", "--python", cmd, "--mesh", "4x2x1"], fake)
    assert out.returncode == 0, out.stderr
    assert parse_dry_run(out.stdout)["nodes"][0]["run"] == [*cmd.split(), TRAIN, "--mesh", "4x2x1"]


def test_dgx_dry_run_and_run(fake):
    """2 nodes x 8 GPUs: one srun task per node runs torchrun in the container; the checkout is mounted
    over the image's editable install."""
    args = ["--image", "/images/ucfvit.sqsh", "--mounts", "/data:/data", *TRAIN_ARGS]
    dry = launch(DGX, ["--dry-run", "--nodes=2", *args], fake)
    assert dry.returncode == 0, dry.stderr
    plan = parse_dry_run(dry.stdout)
    assert [n["host"] for n in plan["nodes"]] == ["node0", "node1"]
    rendezvous = ["--rdzv_backend", "c10d", "--rdzv_endpoint", "node0:29500", "--rdzv_id", "ucfvit-JOBID"]
    train = ["/opt/ucfvit/recipes/train.py", *TRAIN_ARGS]
    torchrun = ["torchrun", "--nnodes", "2", "--nproc_per_node", "8", *rendezvous, *train]
    for node in plan["nodes"]:
        assert node["run"] == torchrun and node["ranks"] == "8 ranks"
        assert (node["env"]["MASTER_ADDR"], node["env"]["MASTER_PORT"]) == ("node0", "29500")
        assert node["env"]["NCCL_DEBUG"] == "WARN"
    srun = plan["launch"]
    tasks = ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpu-bind=none"]
    mounts = f"--container-mounts={ROOT}:/opt/ucfvit,{ROOT}:{ROOT},/data:/data"
    container = ["--container-image=/images/ucfvit.sqsh", mounts, f"--container-workdir={ROOT}"]
    assert srun[: len(srun) - len(torchrun)] == ["srun", *tasks, *container]
    assert srun[len(srun) - len(torchrun) :] == torchrun
    assert recorded(fake, "srun") is None

    real = launch(DGX, args, fake, **ALLOCATION)
    assert real.returncode == 0, real.stderr
    srun_args, srun_env = recorded(fake, "srun")
    assert srun_args[-len(torchrun) :] == [
        arg.replace("node0:29500", "frontier00001:13456").replace("JOBID", "123456") for arg in torchrun
    ]
    assert srun_env["MASTER_ADDR"] == "frontier00001"


def test_dgx_without_container(fake):
    out = launch(DGX, ["--dry-run", "--no-container", "--nodes", "1", "--mesh", "1x8x1"], fake)
    assert out.returncode == 0, out.stderr
    plan = parse_dry_run(out.stdout)
    assert plan["nodes"][0]["run"][-3:] == [TRAIN, "--mesh", "1x8x1"]
    assert not any(arg.startswith("--container") for arg in plan["launch"])


def test_local_dry_run_and_run(fake):
    train_args = [*TRAIN_ARGS[:2], "--mesh", "2x2x2", *TRAIN_ARGS[4:]]
    dry = launch(LOCAL, ["--dry-run", "--nproc-per-node", "8", *train_args], fake)
    assert dry.returncode == 0, dry.stderr
    plan = parse_dry_run(dry.stdout)
    torchrun = ["torchrun", "--standalone", "--nproc_per_node", "8", TRAIN, *train_args]
    assert plan["launch"] == torchrun and len(plan["nodes"]) == 1
    assert plan["nodes"][0]["run"] == torchrun and plan["nodes"][0]["ranks"] == "ranks 0-7"
    assert recorded(fake, "torchrun") is None

    real = launch(LOCAL, ["--nproc-per-node", "8", *train_args], fake)
    assert real.returncode == 0, real.stderr
    assert recorded(fake, "torchrun")[0] == torchrun[1:]


def test_local_counts_gpus(fake):
    """Without --nproc-per-node: the GPUs torch sees (the fake python says 4), else 1."""
    out = launch(LOCAL, ["--dry-run", "--python", str(fake[0] / "python"), "--mesh", "1x2x2"], fake)
    assert out.returncode == 0, out.stderr
    assert parse_dry_run(out.stdout)["launch"][2:4] == ["--nproc_per_node", "4"]
    out = launch(LOCAL, ["--dry-run", "--model", "vit"], fake, UCFVIT_PYTHON="/nonexistent/python")
    assert out.returncode == 0, out.stderr
    assert parse_dry_run(out.stdout)["launch"][2:4] == ["--nproc_per_node", "1"]


@pytest.mark.parametrize(
    ("script", "args", "env", "names"),
    [
        (FRONTIER, ["--dry-run", "--node", "2"], {}, "--node"),
        (DGX, ["--dry-run", "--image", "x", "--gpus", "4"], {}, "--gpus"),
        (LOCAL, ["--dry_run"], {}, "--dry_run"),
        (FRONTIER, ["--dry-run", "--nodes", "0"], {}, "--nodes 0"),
        (DGX, ["--dry-run", "--image", "x", "--gpus-per-node=-1"], {}, "--gpus-per-node -1"),
        (LOCAL, ["--nproc-per-node", "two"], {}, "--nproc-per-node two"),
        (FRONTIER, ["--dry-run", "--port", "70000"], {}, "--port 70000"),
        (FRONTIER, ["--dry-run", "--nodes"], {}, "--nodes needs a value"),
        (FRONTIER, ["--dry-run", "--nodes", "2", "--model", "mae"], {}, "missing --mesh"),
        (DGX, ["--dry-run", "--image", "x", "--nodes", "2", "--mesh", "2x2x2"], {}, "--mesh 2x2x2 has 8 ranks"),
        (LOCAL, ["--nproc-per-node", "4", "--mesh", "2x2"], {}, "--mesh 2x2: must be three"),
        (FRONTIER, ["--dry-run", "--help=yes"], {}, "--help takes no value"),
        (FRONTIER, ["--mesh", "1x8x1"], {}, "not inside a SLURM allocation"),
        (DGX, ["--dry-run", "--mesh", "1x8x1"], {}, "--image"),
        (FRONTIER, ["--dry-run", "--nodes", "3", "--mesh", "3x8x1"], ALLOCATION, "--nodes 3: the allocation has only"),
    ],
)
def test_bad_launcher_input(fake, script, args, env, names):
    """One line on stderr naming the option, exit 2, nothing started."""
    out = launch(script, args, fake, **env)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and " error: " in lines[0] and names in lines[0], out.stderr
    assert recorded(fake, "srun") is None and recorded(fake, "torchrun") is None


def test_dry_run_refuses_a_misspelt_training_flag_with_the_trainers_message(fake):
    """The dry run parses the training options with recipes/train.py's parser (in the python that runs the
    trainer): a typo fails before the queue, in one line; correct options pass without a warning."""
    typo = ["--dry-run", "--nodes", "1", "--python", sys.executable, "--model", "mae", "--mesh", "1x8x1"]
    out = launch(FRONTIER, [*typo, "--max-stepz", "10"], fake)
    assert out.returncode == 2 and out.stdout == "", out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == [
        "frontier/train.sbatch: error: recipes/train.py refuses '--model mae --mesh 1x8x1 --max-stepz 10': "
        "Unrecognized options: --max-stepz, 10 (did you mean --max-steps?)"
    ]
    out = launch(
        DGX,
        ["--dry-run", "--image", "x", "--nodes", "1", "--model", "mae", "--mesh", "1x8x1"],
        fake,
        UCFVIT_PYTHON=sys.executable,
    )
    assert out.returncode == 0 and out.stderr == "" and parse_dry_run(out.stdout)["launch"], out.stderr


def test_train_arguments_after_double_dash_pass_verbatim(fake):
    """After --, even a launcher option goes to recipes/train.py (where it is the trainer's to judge)."""
    out = launch(LOCAL, ["--dry-run", "--nproc-per-node", "1", "--", "--dry-run", "--nodes", "2"], fake)
    assert out.returncode == 0, out.stderr
    assert parse_dry_run(out.stdout)["launch"][-3:] == ["--dry-run", "--nodes", "2"]


def test_help(fake):
    for script in LAUNCHERS:
        out = launch(script, ["--help"], fake)
        assert out.returncode == 0 and "--dry-run" in out.stdout and "recipes/train.py" in out.stdout, out.stderr
