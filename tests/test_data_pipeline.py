"""The data pipeline on several ranks and through the trainer: tp groups read identical batches,
data-parallel ranks disjoint ones, datasets are balanced, resumes continue exactly (also on
another mesh), bad data stops every rank with one clear error, and the data commands of docs/data.md run."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_files import image_folder, nifti_dataset, npy_dataset
from distributed import run_ranks
from test_train_e2e import losses, torchrun, wait
from ucfvit.train.presets import preset


def test_eight_ranks_on_2x2x2_identical_in_tp_disjoint_over_dp_balanced_over_three_datasets(tmp_path):
    dirs = {
        "big": str(npy_dataset(tmp_path / "big", 6, (32, 32))),  # 6 x 16 tiles of 8x8
        "mid": str(npy_dataset(tmp_path / "mid", 2, (16, 16), seed=1)),  # 2 x 4 tiles
        "small": str(npy_dataset(tmp_path / "small", 1, (8, 8), seed=2)),  # 1 tile
    }
    steps = 4
    out = run_ranks(8, "data_cases:loader_digests", dirs, "2x2x2", str(tmp_path / "run"), steps, 8, [8, 8], 1)
    assert {r["rank"] for r in out} == set(range(8))
    assert out[0]["sizes"] == {"big": 96, "mid": 8, "small": 1}
    assert all(r["ranks"] == [2, 1, 1] for r in out)  # D'Hondt: the big dataset gets the spare rank
    assert all(len(r["batches"]) == steps for r in out)  # every rank runs the same steps
    by_dp: dict[int, list[dict]] = {}
    for r in out:
        by_dp.setdefault(r["dp_rank"], []).append(r)
    for dp, group in by_dp.items():
        assert len(group) == 2 and group[0]["batches"] == group[1]["batches"], f"tp group of dp rank {dp} differs"
    assert [by_dp[d][0]["dataset"] for d in range(4)] == ["big", "big", "mid", "small"]
    big0, big1 = set(by_dp[0][0]["samples"]), set(by_dp[1][0]["samples"])
    assert len(big0) == len(big1) == 2 * steps and not big0 & big1  # disjoint within the epoch
    # The one-sample dataset is reused (wraps into a new epoch) so its rank keeps up with the others.
    assert len(set(by_dp[3][0]["samples"])) == 1
    index = json.loads((tmp_path / "run" / "data" / "index.json").read_text())
    assert set(index["datasets"]) == set(dirs)


def _args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--data.kind", "npy", "--data.root", str(root), "--data.tile", "16", "16", "--arch.img-size", "16", "16",
            "--arch.in-chans", "1", "--data.global-batch-size", "8", "--metrics.log-every", "1",
            "--run.dir", str(run_dir), *extra]  # fmt: skip


def test_resume_mid_epoch_on_another_mesh_gives_the_uninterrupted_run(tmp_path):
    """5 files x 4 tiles = 20 samples, 8 per step: the checkpoint at step 3 is mid-epoch (position 24).
    The reference is the same 2x2x2 run continued: initial weights differ between tp degrees, so runs
    on two meshes are compared from one checkpoint."""
    root = npy_dataset(tmp_path / "data", 5, (32, 32))
    src = tmp_path / "src"
    run_ranks(8, "train_cases:run", "mae", _args(root, src, "--max-steps", "6", "--mesh", "2x2x2",
                                                  "--checkpoint.every", "3"))  # fmt: skip
    state = json.loads((src / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert state["data_positions"] == {"npy": 24}
    dst = tmp_path / "dst"
    ckpt = str(src / "checkpoints" / "step-00000003")
    run_ranks(4, "train_cases:run", "mae", _args(root, dst, "--max-steps", "6", "--mesh", "1x2x2",
                                                  "--checkpoint.resume", ckpt))  # fmt: skip
    expected, resumed = losses(src), losses(dst)
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step][0] == pytest.approx(expected[step][0], rel=1e-5), step


def test_bad_data_stops_every_rank_with_the_file_named_or_is_skipped(tmp_path):
    root = npy_dataset(tmp_path / "data", 4, (32, 32))
    (root / "f001.npy").write_bytes(b"\x93NUMPY garbage")
    argv = _args(root, tmp_path / "bad", "--max-steps", "2", "--mesh", "1x2x1")
    for msg in run_ranks(2, "train_cases:error", "mae", argv, timeout=120):
        assert "f001.npy" in msg and msg.startswith("ValueError"), msg
    out = run_ranks(2, "train_cases:run", "mae", _args(root, tmp_path / "skip", "--max-steps", "2", "--mesh", "1x2x1",
                                                        "--data.skip-bad-files"))  # fmt: skip
    assert out[0]["steps"] == 2
    index = json.loads((tmp_path / "skip" / "data" / "index.json").read_text())
    assert len(index["datasets"]["npy"]["entries"]) == 3


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
    argv = [*_args(root, tmp_path / "run", "--max-steps", "1"), *extra]
    msg = run_ranks(1, "train_cases:error", "mae", argv, timeout=120)[0]
    assert match in msg, msg
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_a_file_that_breaks_after_indexing_surfaces_from_the_worker(tmp_path):
    root = npy_dataset(tmp_path / "data", 3, (16, 16))
    run_dir = tmp_path / "run"
    run_ranks(1, "train_cases:run", "mae", _args(root, run_dir, "--max-steps", "1"))
    np.save(root / "f002.npy", np.zeros((16, 16), np.int8)[:1])  # a different shape than indexed
    argv = _args(root, tmp_path / "run2", "--max-steps", "3", "--data.num-workers", "1")
    (tmp_path / "run2" / "data").mkdir(parents=True)
    (tmp_path / "run2" / "data" / "index.json").write_text((run_dir / "data" / "index.json").read_text())
    msg = run_ranks(1, "train_cases:error", "mae", argv, timeout=120)[0]
    assert "f002.npy" in msg, msg


def test_single_channel_sap_trains_on_a_tree_per_channel(tmp_path):
    root = npy_dataset(tmp_path / "data", 2, (16, 16), channels=2)
    (tmp_path / "seg").mkdir()
    for name in ("f000.npy", "f001.npy"):
        np.save(tmp_path / "seg" / name, (np.load(root / name)[0] > 10).astype(np.uint8))
    argv = [*_args(root, tmp_path / "run", "--max-steps", "2"), "--arch.in-chans", "2", "--arch.variables", "ct", "pet",
            "--arch.patch-size", "4", "--arch.fixed-length", "10", "--arch.num-classes", "2", "--data.labels",
            str(tmp_path / "seg")]  # fmt: skip
    refused = run_ranks(1, "train_cases:error", "sap", [*argv, "--data.separate-channels"], timeout=120)[0]
    assert "--data.separate-channels" in refused and "--arch.single-channel" in refused, refused
    out = run_ranks(1, "train_cases:run", "sap", [*argv, "--arch.single-channel", "True", "--data.separate-channels"])[
        0
    ]
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
    argv = ["--model", "mae", "--config", str(config), "--mesh", "2x1x1", "--data.global-batch-size", "4",
            "--max-steps", "3", "--metrics.log-every", "1", "--run.dir", str(run_dir)]  # fmt: skip
    text = wait(torchrun(2, argv, log), log)
    assert sorted(losses(run_dir)) == [1, 2, 3], text[-3000:]
    plan = json.loads((run_dir / "data" / "plan.json").read_text())
    assert plan["names"] == ["big", "small"] and plan["ranks"] == [1, 1], plan
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model"] == "mae" and saved["data"]["datasets"]["small"]["root"] == str(small)
    assert saved["optim"] == json.loads(json.dumps(preset("mae", accelerator=False).to_dict()["optim"]))


def documented_data_command(kind: str) -> list[str]:
    """The arguments of docs/data.md's one-process ``python recipes/train.py ... --data.kind KIND`` command."""
    for line in (Path(__file__).parents[1] / "docs" / "data.md").read_text().splitlines():
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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "data.py"), "--quick", "--workers", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=True).stdout
    record = json.loads(out.strip().splitlines()[-1])
    rates = [v for k, v in record.items() if k.endswith("_per_s") or k.endswith("_per_s_per_worker")]
    assert len(rates) >= 6 and all(r > 0 for r in rates), record
    assert record["nifti_tiling_GB_per_s"] > 0 and isinstance(record["keeps_up"], bool)
