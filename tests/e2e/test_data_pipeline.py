"""The data pipeline through the trainer and the recipe: bad inputs are named before training, a file
that breaks after indexing surfaces from the loader's worker, single-channel SAP trains on a tree per
channel, several datasets from a config file train balanced, the data commands of docs/data.md run,
and the data benchmark reports its rates. On several ranks: tests/distributed/test_data_pipeline.py."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import train_runs
from data_files import image_folder, nifti_dataset, npy_dataset, npy_train_args
from rank_runner import run_ranks
from torchrun_jobs import torchrun, wait
from train_runs import losses
from ucfvit.train.presets import preset


@pytest.mark.parametrize(
    "setup, extra, match",
    [
        ("empty", [], "no npy files"),
        ("small", [], "--data.pad-value"),
        ("two_channels", [], "--arch.in-chans 2"),
        ("two_channels", ["--data.variables", "a", "b", "--arch.variables", "c"], "--data.variables"),
    ],
)
def test_bad_inputs_are_named_before_training(tmp_path, setup, extra, match):
    root = tmp_path / "data"
    root.mkdir()
    if setup == "small":
        np.save(root / "tiny.npy", np.zeros((8, 8), np.float32))
    if setup == "two_channels":
        np.save(root / "two.npy", np.zeros((2, 16, 16), np.float32))
    argv = [*npy_train_args(root, tmp_path / "run", "--max-steps", "1"), *extra]
    msg = run_ranks(1, train_runs.error, "mae", argv, timeout=120)[0]
    assert match in msg, msg
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_a_file_that_breaks_after_indexing_surfaces_from_the_worker(tmp_path):
    root = npy_dataset(tmp_path / "data", 3, (16, 16))
    run_dir = tmp_path / "run"
    run_ranks(1, train_runs.run, "mae", npy_train_args(root, run_dir, "--max-steps", "1"))
    np.save(root / "f002.npy", np.zeros((16, 16), np.int8)[:1])  # a different shape than indexed
    argv = npy_train_args(root, tmp_path / "run2", "--max-steps", "3", "--data.num-workers", "1")
    (tmp_path / "run2" / "data").mkdir(parents=True)
    (tmp_path / "run2" / "data" / "index.json").write_text((run_dir / "data" / "index.json").read_text())
    msg = run_ranks(1, train_runs.error, "mae", argv, timeout=120)[0]
    assert "f002.npy" in msg, msg


def test_a_data_error_on_one_of_two_ranks_is_that_ranks_line_first(tmp_path):
    """Rank 1 alone reads a label mask with a class beyond the model's: its one line names the file and
    comes first; rank 0 says in one line that it stopped because of it, with no gloo traceback."""
    images, labels = npy_dataset(tmp_path / "images", 4, (16, 16)), tmp_path / "labels"
    labels.mkdir()
    for k in range(4):
        np.save(labels / f"f{k:03d}.npy", np.full((16, 16), 9 if k == 3 else k % 3, np.int64))
    argv = npy_train_args(images, tmp_path / "run", "--max-steps", "2", "--mesh", "2x1x1", "--data.no-shuffle")
    argv += ["--model", "unetr", "--data.labels", str(labels), "--data.global-batch-size", "4"]
    out = wait(torchrun(2, argv, tmp_path / "log"), tmp_path / "log")
    lines = [line for line in out.splitlines() if line.startswith("recipes/train.py: ")]
    assert lines[0].startswith("recipes/train.py: data error: ") and "f003.npy: label values" in lines[0], out
    # rank 0 says why it stopped, unless torchrun's SIGTERM (sent once rank 1 exits) ended it first
    assert lines[1:] in ([], ["recipes/train.py: rank 0: stopped because another rank failed; see its error above"])
    ours = Path(__file__).resolve().parents[2] / "ucfvit"
    assert f'File "{ours}' not in out and "gloo" not in out  # no traceback through our code, no gloo error


def test_single_channel_sap_trains_on_a_tree_per_channel(tmp_path):
    root = npy_dataset(tmp_path / "data", 2, (16, 16), channels=2)
    (tmp_path / "seg").mkdir()
    for name in ("f000.npy", "f001.npy"):
        np.save(tmp_path / "seg" / name, (np.load(root / name)[0] > 10).astype(np.uint8))
    argv = [
        *npy_train_args(root, tmp_path / "run", "--max-steps", "2"),
        *["--arch.in-chans", "2", "--arch.variables", "ct", "pet", "--arch.patch-size", "4"],
        *["--arch.fixed-length", "10", "--arch.num-classes", "2", "--data.labels", str(tmp_path / "seg")],
    ]
    refused = run_ranks(1, train_runs.error, "sap", [*argv, "--data.separate-channels"], timeout=120)[0]
    assert "--data.separate-channels" in refused and "--arch.single-channel" in refused, refused
    out = run_ranks(1, train_runs.run, "sap", [*argv, "--arch.single-channel", "True", "--data.separate-channels"])[0]
    assert out["steps"] == 2 and np.isfinite(out["loss"])


def test_several_datasets_from_a_partial_config_file_train_balanced(tmp_path):
    """`--model mae --config datasets.json`: the recipe with the file's two datasets on top; two
    data-parallel ranks, one per dataset, run the same steps; the plan is saved with the run."""
    big, small = npy_dataset(tmp_path / "big", 6, (16, 16)), npy_dataset(tmp_path / "small", 2, (16, 16), seed=1)
    datasets = {
        "big": {"kind": "npy", "root": str(big), "tile": [16, 16]},
        "small": {"kind": "npy", "root": str(small)},
    }
    config = tmp_path / "datasets.json"
    config.write_text(json.dumps({"arch": {"img_size": [16, 16], "in_chans": 1}, "data": {"datasets": datasets}}))
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    argv = [
        *["--model", "mae", "--config", str(config), "--mesh", "2x1x1", "--data.global-batch-size", "4"],
        *["--max-steps", "3", "--metrics.log-every", "1", "--run.dir", str(run_dir)],
    ]
    text = wait(torchrun(2, argv, log), log)
    assert sorted(losses(run_dir)) == [1, 2, 3], text[-3000:]
    plan = json.loads((run_dir / "data" / "plan.json").read_text())
    assert plan["names"] == ["big", "small"] and plan["ranks"] == [1, 1], plan
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model"] == "mae" and saved["data"]["datasets"]["small"]["root"] == str(small)
    assert saved["optim"] == json.loads(json.dumps(preset("mae", accelerator=False).to_dict()["optim"]))


def documented_data_command(kind: str) -> list[str]:
    """The arguments of docs/data.md's one-process ``python recipes/train.py ... --data.kind KIND`` command."""
    for line in (Path(__file__).parents[2] / "docs" / "data.md").read_text().splitlines():
        if line.startswith("python recipes/train.py ") and f"--data.kind {kind} " in f"{line} ":
            return shlex.split(line, comments=True)[2:]
    raise AssertionError(f"docs/data.md has no `python recipes/train.py ... --data.kind {kind}` command")


@pytest.mark.parametrize("kind", ["nifti", "imagefolder"])
def test_documented_data_commands_train_from_the_command_line(tmp_path, kind):
    """docs/data.md's commands with DIR replaced by generated files (and this test's own run directory)."""
    if kind == "nifti":
        root = nifti_dataset(tmp_path / "ct", 2, (24, 20, 16))
    else:
        root = image_folder(tmp_path / "images", classes=3, per_class=4)
    argv = [str(root) if word == "DIR" else word for word in documented_data_command(kind)]
    assert str(root) in argv, f"docs/data.md's {kind} command should read --data.root DIR: {argv}"
    log = tmp_path / "log.txt"
    run_dir = tmp_path / "run"
    text = wait(torchrun(1, [*argv, "--max-steps", "4", "--run.dir", str(run_dir)], log), log)
    assert 4 in losses(run_dir) if (run_dir / "metrics.jsonl").exists() else False, text[-3000:]
    cfg = json.loads((run_dir / "config.json").read_text())
    if kind == "nifti":
        assert cfg["arch"]["img_size"] == [16, 16, 16] and cfg["arch"]["in_chans"] == 1
    else:
        assert cfg["arch"]["num_classes"] == 3
    assert (run_dir / "data" / "plan.json").exists() and os.path.getsize(run_dir / "data" / "index.json") > 0


def test_data_benchmark_prints_one_json_line_of_rates():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    cmd = [sys.executable, str(Path(__file__).parents[2] / "benchmarks" / "data.py"), "--quick", "--workers", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=True).stdout
    record = json.loads(out.strip().splitlines()[-1])
    rates = [v for k, v in record.items() if k.endswith("_per_s") or k.endswith("_per_s_per_worker")]
    assert len(rates) >= 6 and all(r > 0 for r in rates), record
    assert record["nifti_tiling_GB_per_s"] > 0 and isinstance(record["keeps_up"], bool)
