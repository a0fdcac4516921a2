"""The scaling sweep: benchmarks/sweep.py (SLURM scripts + manifest) and benchmarks/collect.py (tables, plots).

No training: the generator's scripts are read and parsed by ``bash -n``, the collector reads metrics.jsonl
files written here with known numbers.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


sweep = _load("sweep")
collect = _load("collect")

BASE = ["--account", "ABC123", "--time", "01:00:00", "--models", "vit:large"]


def generate(out: Path, *args: str, system: str = "frontier") -> dict:
    sweep.main(["--system", system, *BASE, "--out", str(out), *args])
    return json.loads((out / "manifest.json").read_text())


def directives(script: str) -> dict[str, str]:
    return dict(
        line.removeprefix("#SBATCH ").partition(" ")[::2] for line in script.splitlines() if line[:7] == "#SBATCH"
    )


def launcher_call(script: str) -> list[str]:
    (line,) = [line for line in script.splitlines() if line.startswith("exec bash ")]
    return shlex.split(line)


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_weak_and_strong_scripts_and_manifest(tmp_path, capsys):
    out = tmp_path / "sweep"
    sizes = ["--nodes", "1", "2", "4", "--scaling", "both", "--per-gpu-batch", "16"]
    manifest = generate(out, *sizes, "--extra=--parallel.activation-checkpointing full")
    assert "6 runs in" in capsys.readouterr().out
    assert manifest["system"] == "frontier" and manifest["peak_tflops_per_gpu"] == 191.5
    runs = manifest["runs"]
    assert [(r["scaling"], r["nodes"], r["mesh"], r["global_batch"]) for r in runs] == [
        ("weak", 1, "1x8x1", 128),
        ("weak", 2, "2x8x1", 256),
        ("weak", 4, "4x8x1", 512),
        ("strong", 1, "1x8x1", 128),
        ("strong", 2, "2x8x1", 128),
        ("strong", 4, "4x8x1", 128),
    ]
    assert sorted(p.name for p in (out / "scripts").iterdir()) == sorted(f"{r['name']}.sbatch" for r in runs)
    assert len({r["run_dir"] for r in runs}) == 6
    for run in runs:
        assert (run["system"], run["model"], run["size"], run["gpus"]) == ("frontier", "vit", "large", 8 * run["nodes"])
        assert run["script"] == f"scripts/{run['name']}.sbatch" and run["run_dir"] == f"runs/{run['name']}"
        script = (out / run["script"]).read_text()
        assert script.startswith("#!/bin/bash\n")
        assert directives(script) == {
            "-J": run["name"],
            "-A": "ABC123",
            "-N": str(run["nodes"]),
            "-t": "01:00:00",
            "-o": f"{out.resolve()}/logs/{run['name']}-%j.out",
        }
        assert f"\ncd {out.resolve()}\n" in script
        call = launcher_call(script)
        assert call[:5] == ["exec", "bash", f"{ROOT}/launch/frontier/train.sbatch", "$@", "--"]
        args = call[5:]
        assert args == run["train_args"]
        assert (option(args, "--model"), option(args, "--model-size")) == ("vit", "large")
        ddp, fsdp, tp = map(int, option(args, "--mesh").split("x"))
        assert ddp * fsdp * tp == run["nodes"] * 8 and option(args, "--mesh") == run["mesh"]
        assert int(option(args, "--data.global-batch-size")) == run["global_batch"]
        assert option(args, "--max-steps") == "100"
        assert option(args, "--run.dir") == str(out.resolve() / run["run_dir"])
        assert args[-2:] == ["--parallel.activation-checkpointing", "full"]
    submit = (out / "submit_all.sh").read_text()
    assert all(r["name"] in submit for r in runs) and 'sbatch --parsable "$@" "scripts/$name.sbatch"' in submit
    for path in [out / "submit_all.sh", *(out / "scripts").iterdir()]:
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, f"{path}: {result.stderr}"


def test_dgx_mesh_rules(tmp_path):
    meshes = ["--meshes", "auto", "ddp=1,fsdp=*,tp=1", "2x4x2", "ddp=*,fsdp=4,tp=2"]
    slurm = ["--partition", "batch", "--launcher-args=--image /images/ucfvit.sqsh"]
    manifest = generate(tmp_path / "s", "--nodes", "1", "2", *meshes, *slurm, system="dgx")
    assert manifest["peak_tflops_per_gpu"] == 989.0
    # auto and ddp=1,fsdp=*,tp=1 agree on one node (1x8x1: one run); 2x4x2 is for 16 GPUs only.
    assert [(r["nodes"], r["mesh"], r["mesh_rule"]) for r in manifest["runs"]] == [
        (1, "1x8x1", "auto"),
        (1, "1x4x2", "ddp=*,fsdp=4,tp=2"),
        (2, "2x8x1", "auto"),
        (2, "1x16x1", "ddp=1,fsdp=*,tp=1"),
        (2, "2x4x2", "2x4x2"),
    ]
    script = (tmp_path / "s" / manifest["runs"][0]["script"]).read_text()
    assert directives(script)["-p"] == "batch" and directives(script)["--gpus-per-node=8"] == ""
    call = launcher_call(script)
    assert call[2:7] == [f"{ROOT}/launch/dgx/train.sbatch", "$@", "--image", "/images/ucfvit.sqsh", "--"]


@pytest.mark.parametrize("system", ["frontier", "dgx"])
def test_scripts_drive_the_launcher_dry_run(tmp_path, system):
    """Each script, given --dry-run, has the system's launcher print the job it would start (no SLURM here)."""
    if not (ROOT / "launch" / system / "train.sbatch").exists():
        pytest.skip(f"launch/{system}/train.sbatch is not in this checkout")
    container = ["--launcher-args=--no-container"] if system == "dgx" else []  # the DGX launcher wants an image
    manifest = generate(tmp_path / "s", "--nodes", "1", "2", *container, system=system)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for run in manifest["runs"]:
        result = subprocess.run(
            ["bash", str(tmp_path / "s" / run["script"]), "--dry-run"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        (launch,) = [shlex.split(line) for line in result.stdout.splitlines() if line.startswith("launch ")]
        assert f"--nodes={run['nodes']}" in launch and launch[-len(run["train_args"]) :] == run["train_args"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--meshes", "3x2x2"], "--meshes 3x2x2: ddp*fsdp*tp matches no node count (--nodes x 8: 8, 16)"),
        (["--meshes", "ddp=1,fsdp=8,tp=1"], "--meshes ddp=1,fsdp=8,tp=1: mesh 1x8x1 has 8 ranks but --nodes 2 has 16"),
        (["--meshes", "1x8x1"], "--meshes: no mesh for --nodes 2 (16 GPUs)"),
        (["--meshes", "1x1x16"], "--meshes 1x1x16: tp=16 must divide the 8 GPUs of a node"),
        (["--meshes", "ddp=*,fsdp=1,tp=16"], "--meshes ddp=*,fsdp=1,tp=16: tp=16 must divide the 8 GPUs of a node"),
        (
            ["--models", "vit:base", "--meshes", "ddp=*,fsdp=1,tp=8"],
            "--meshes with tp=8 for --models vit:base: "
            "blocks.0.attn has 12 heads: num_heads=12 is not divisible by tp=8",
        ),
        (
            ["--scaling", "strong", "--global-batch", "100"],
            "--global-batch: strong scaling on mesh 1x8x1 has global "
            "batch 100, not divisible by the data-parallel size ddp*fsdp=8",
        ),
        (["--models", "vit:enormous"], "--models vit:enormous: size 'enormous' is unknown"),
        (["--models", "resnet:large"], "--models resnet:large: model='resnet' is unknown"),
        (["--extra=--mesh 1x1x8"], "--extra sets --mesh, which the sweep sets for each run"),
        (
            ["--extra=--parallel.activation-checkpointin full"],
            "Unrecognized options: --parallel.activation-checkpointin",
        ),
        (["--time", "90"], "--time 90: write HH:MM:SS"),
    ],
    ids=[
        "literal-mesh-product",
        "template-product",
        "node-count-without-mesh",
        "tp-over-node-literal",
        "tp-over-node",
        "tp-heads",
        "batch-divisibility",
        "size",
        "model",
        "extra-sets-mesh",
        "extra-typo",
        "time",
    ],
)
def test_bad_input_is_refused_in_one_line(tmp_path, args, message):
    out = tmp_path / "s"
    with pytest.raises(SystemExit) as err:
        sweep.main(["--system", "frontier", *BASE, "--nodes", "1", "2", "--out", str(out), *args])
    text = str(err.value)
    assert text.startswith("sweep.py: error: ") and "\n" not in text and message in text, text
    assert not out.exists()


def test_non_empty_out_is_refused_and_kept(tmp_path):
    out = tmp_path / "s"
    generate(out, "--nodes", "1")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit, match=f"--out {out}: exists and is not an empty directory"):
        sweep.main(["--system", "frontier", *BASE, "--nodes", "1", "2", "--out", str(out)])
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# --- the collector on fabricated runs --------------------------------------------------------------------


def record(step: int, images: float, mem: float = 20.0, mfu: float | None = None, max_steps: int = 100) -> dict:
    return {
        "step": step,
        "max_steps": max_steps,
        "loss": 1.0,
        "lr": 1e-4,
        "grad_norm": 1.0,
        "images_per_s": images,
        "tokens_per_s": images * 196,
        "tflops": images / 2,
        "mfu": mfu,
        "peak_mem_gib": mem,
        "eta_s": 1.0,
        "time": 1.8e9 + step,
    }


def write_run(run_dir: Path, rates: list[float], *, last: int = 100, mfu: float | None = None, tail: str = "") -> None:
    """config.json and metrics.jsonl: two warm-up records (slow, less memory), then ``rates`` every 10 steps
    ending at step ``last``, a validation line and another record kind on the way, and ``tail`` appended."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"model": "vit", "model_size": "large"}))
    first = last - 10 * len(rates)
    lines = [record(first - 10, 5.0, mem=4.0), record(first, 7.0, mem=4.0)]
    lines += [record(first + 10 * (i + 1), rate, mfu=mfu) for i, rate in enumerate(rates)]
    lines.insert(3, {"step": lines[2]["step"], "eval": {"loss": 0.5, "top1": 0.1}})
    lines.insert(2, {"event": "checkpoint", "path": "x"})
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (run_dir / "metrics.jsonl").write_text(text + tail)


@pytest.fixture
def fabricated(tmp_path):
    """A frontier sweep over 1, 2, 4, 8 nodes, weak and strong, with runs in every state."""
    out = tmp_path / "sweep"
    generate(out, "--nodes", "1", "2", "4", "8", "--scaling", "both")
    runs = out / "runs"
    for nodes, rate in [(1, 100.0), (2, 190.0), (4, 360.0)]:
        write_run(runs / f"vit-large-weak-n{nodes}-{nodes}x8x1", [rate] * 8)
    write_run(runs / "vit-large-weak-n8-8x8x1", [640.0], last=30, mfu=0.4)  # still running, with its own MFU
    (runs / "vit-large-weak-n8-8x8x1" / ".lock").write_text('{"job": "slurm:1", "host": "h", "pid": 1}')
    write_run(runs / "vit-large-strong-n1-1x8x1", [100.0] * 8)
    # Crashed at step 50 while writing a line: rates 200 and 150 over 10 steps each, then a cut line.
    write_run(runs / "vit-large-strong-n2-2x8x1", [200.0, 150.0], last=50, tail='{"step": 60, "max_steps": 10')
    (runs / "vit-large-strong-n4-4x8x1").mkdir()  # crashed before its first record
    (runs / "vit-large-strong-n4-4x8x1" / "config.json").write_text("{}")
    return out  # vit-large-strong-n8-8x8x1: never started


def test_collector_numbers_statuses_table_and_plots(fabricated, capsys):
    collect.main([str(fabricated)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["benchmark"] == "scaling_collect" and summary["runs"] == 8
    assert summary["status"] == {"done": 4, "running": 1, "stopped": 1, "failed": 1, "missing": 1}
    assert summary["series"]["vit:large weak"]["gpus"] == [8, 16, 32, 64]

    with open(fabricated / "results.csv") as f:
        rows = {r["name"].removeprefix("vit-large-"): r for r in csv.DictReader(f)}
    assert list(rows) == [f"{k}-n{n}-{n}x8x1" for k in ("weak", "strong") for n in (1, 2, 4, 8)]
    numbers = ("images_per_s", "images_per_s_per_gpu", "efficiency", "tflops_per_gpu", "mfu", "peak_mem_gib")
    col = {name: {k: float(r[k]) if r[k] else None for k in numbers} for name, r in rows.items()}
    assert {k: r["status"] for k, r in rows.items()} == {
        "weak-n1-1x8x1": "done",
        "weak-n2-2x8x1": "done",
        "weak-n4-4x8x1": "done",
        "weak-n8-8x8x1": "running",
        "strong-n1-1x8x1": "done",
        "strong-n2-2x8x1": "stopped",
        "strong-n4-4x8x1": "failed",
        "strong-n8-8x8x1": "missing",
    }
    assert [rows[f"weak-n{n}-{n}x8x1"]["records"] for n in (1, 2, 4, 8)] == ["8", "8", "8", "1"]
    for n, rate, eff in [(1, 100.0, 1.0), (2, 190.0, 0.95), (4, 360.0, 0.9), (8, 640.0, 0.8)]:
        r = col[f"weak-n{n}-{n}x8x1"]
        assert r["images_per_s"] == pytest.approx(rate) and r["images_per_s_per_gpu"] == pytest.approx(rate / (8 * n))
        assert r["efficiency"] == pytest.approx(eff)
        assert r["tflops_per_gpu"] == pytest.approx(rate / 2 / (8 * n))  # tflops is the job's
        assert r["peak_mem_gib"] == 20.0  # the warm-up records' 4 GiB are skipped
    # MFU from the sweep's peak (191.5 TFLOP/s per MI250X GCD) when the run's own is null, else the run's.
    assert col["weak-n1-1x8x1"]["mfu"] == pytest.approx(50.0 / (8 * 191.5))
    assert col["weak-n8-8x8x1"]["mfu"] == pytest.approx(0.4)
    # Rates 200 and 150 over equal steps: 20 steps in 10/200 + 10/150 s; the cut last line is ignored.
    stopped = col["strong-n2-2x8x1"]
    assert stopped["images_per_s"] == pytest.approx(2 / (1 / 200 + 1 / 150))
    assert stopped["efficiency"] == pytest.approx((2 / (1 / 200 + 1 / 150)) / 100 / 2)
    for name in ("strong-n4-4x8x1", "strong-n8-8x8x1"):
        assert all(v is None for v in col[name].values()) and rows[name]["records"] in ("0", "")

    md = (fabricated / "results.md").read_text()
    assert (
        "| vit-large-weak-n2-2x8x1 | weak | 2 | 16 | 2x8x1 | 512 | done | 190.0 | 11.88 | 0.95 | 5.938 | 3.1% |" in md
    )
    assert "| vit-large-strong-n8-8x8x1 | strong | 8 | 64 | 8x8x1 | 256 | missing | – | – | – | – | – | – |" in md
    assert "| vit-large-weak-n8-8x8x1 | weak | 8 | 64 | 8x8x1 | 2048 | running | 640.0 | 10.00 | 0.80 |" in md
    for name in collect.PLOTS:
        image = cv2.imread(str(fabricated / name))
        assert image is not None and image.shape[0] > 100 and image.shape[1] > 100, name
        assert f"]({name})" in md


def test_collector_stale_lock_and_skip(fabricated, capsys):
    lock = fabricated / "runs" / "vit-large-weak-n8-8x8x1" / ".lock"
    stale = time.time() - collect.STALE_AFTER_S - 60
    os.utime(lock, (stale, stale))
    rows = {r["name"]: r for r in collect.collect([fabricated], skip=0)}
    assert rows["vit-large-weak-n8-8x8x1"]["status"] == "stopped"
    # Without skipping, the warm-up records count: 10 steps at 5/s and 10 at 7/s slow the mean down.
    assert rows["vit-large-weak-n1-1x8x1"]["records"] == 10
    assert rows["vit-large-weak-n1-1x8x1"]["images_per_s"] == pytest.approx(100 / (10 / 5 + 10 / 7 + 80 / 100))


def test_collector_on_run_directories(tmp_path, capsys):
    run = tmp_path / "a"
    write_run(run, [30.0] * 3, last=50)
    (run / "config.json").write_text(
        json.dumps({"model": "mae", "model_size": "debug", "mesh": "1x2x2", "data": {"global_batch_size": 16}})
    )
    with pytest.raises(SystemExit):
        collect.main([str(run)])
    assert "--out is needed" in capsys.readouterr().err
    collect.main([str(run), str(tmp_path / "never-ran"), "--out", str(tmp_path / "out"), "--peak-tflops", "10"])
    with open(tmp_path / "out" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["name"], r["model"], r["gpus"], r["mesh"], r["status"]) for r in rows] == [
        ("a", "mae", "4", "1x2x2", "stopped"),
        ("never-ran", "", "", "", "missing"),
    ]
    assert float(rows[0]["mfu"]) == pytest.approx(15 / (4 * 10))
