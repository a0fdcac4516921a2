"""The data pipeline on several ranks: tp groups read identical batches, data-parallel ranks disjoint
ones, datasets are balanced, a resume continues exactly on another mesh, and bad data stops every
rank with one clear error. Through the trainer on one rank and the recipe:
tests/e2e/test_data_pipeline.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch.distributed as dist

import train_runs
from data_files import npy_dataset, npy_train_args
from rank_runner import run_ranks
from train_runs import losses
from ucfvit.data.config import DataConfig, DatasetConfig
from ucfvit.data.dataset import InputSpec
from ucfvit.data.loader import build_loader
from ucfvit.data.readers import READERS
from ucfvit.parallel import data_parallel_info, make_mesh, parse_mesh
from ucfvit.parallel.mesh import world_size
from ucfvit.train.data_setup import prepare_data


def _digest(t) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def loader_digests(
    datasets: dict[str, str], mesh: str, run_dir: str, steps: int, global_batch: int, tile: list[int], workers: int = 0
) -> dict:
    """Per rank: its coordinates, a digest of every micro-batch and of every sample in it.
    Only rank 0 may read file headers (the others must use the index it wrote)."""
    device_mesh = make_mesh(parse_mesh(mesh, world_size()))
    rank = dist.get_rank()
    if rank != 0:
        for reader in READERS.values():
            reader.header = _forbidden
    data = DataConfig(
        datasets={n: DatasetConfig(kind="npy", root=Path(p), tile=tuple(tile)) for n, p in datasets.items()},
        global_batch_size=global_batch,
        num_workers=workers,
    )
    spec = InputSpec(img_size=tuple(tile), channels=1, variables=("channel0",))
    dp_rank, dp_size = data_parallel_info(device_mesh)
    setup = prepare_data(data, spec, dp_size, seed=7, run_dir=Path(run_dir), rank=rank)
    loader = build_loader(
        setup.sources,
        setup.plan,
        dp_rank,
        [0] * len(setup.sources),
        0,
        steps,
        global_batch // dp_size,
        seed=7,
        num_workers=workers,
    )
    batches = [b["image"] for b in loader]
    dataset, _ = setup.plan.dataset_of(dp_rank)
    return {
        "rank": rank,
        "dp_rank": dp_rank,
        "tp_rank": device_mesh["tp"].get_local_rank(),
        "dataset": setup.plan.names[dataset],
        "ranks": list(setup.plan.ranks),
        "batches": [_digest(b) for b in batches],
        "samples": [_digest(s) for b in batches for s in b],
        "sizes": {s.name: s.size for s in setup.sources},
    }


def _forbidden(self, item):
    raise AssertionError(f"rank {dist.get_rank()} read the header of {item.path}: only rank 0 builds the index")


def test_eight_ranks_on_2x2x2_identical_in_tp_disjoint_over_dp_balanced_over_three_datasets(tmp_path):
    dirs = {
        "big": str(npy_dataset(tmp_path / "big", 6, (32, 32))),  # 6 x 16 tiles of 8x8
        "mid": str(npy_dataset(tmp_path / "mid", 2, (16, 16), seed=1)),  # 2 x 4 tiles
        "small": str(npy_dataset(tmp_path / "small", 1, (8, 8), seed=2)),  # 1 tile
    }
    steps = 4
    out = run_ranks(8, loader_digests, dirs, "2x2x2", str(tmp_path / "run"), steps, 8, [8, 8], 1)
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


def test_resume_mid_epoch_on_another_mesh_gives_the_uninterrupted_run(tmp_path):
    """5 files x 4 tiles = 20 samples, 8 per step: the checkpoint at step 3 is mid-epoch (position 24).
    The reference is the same 2x2x2 run continued: initial weights differ between tp degrees, so runs
    on two meshes are compared from one checkpoint."""
    root = npy_dataset(tmp_path / "data", 5, (32, 32))
    src = tmp_path / "src"
    first = npy_train_args(root, src, "--max-steps", "6", "--mesh", "2x2x2", "--checkpoint.every", "3")
    run_ranks(8, train_runs.run, "mae", first)
    state = json.loads((src / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert state["data_positions"] == {"npy": 24}
    dst = tmp_path / "dst"
    ckpt = str(src / "checkpoints" / "step-00000003")
    resume = npy_train_args(root, dst, "--max-steps", "6", "--mesh", "1x2x2", "--checkpoint.resume", ckpt)
    run_ranks(4, train_runs.run, "mae", resume)
    expected, resumed = losses(src), losses(dst)
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step][0] == pytest.approx(expected[step][0], rel=1e-5), step


def test_bad_data_stops_every_rank_with_the_file_named_or_is_skipped(tmp_path):
    root = npy_dataset(tmp_path / "data", 4, (32, 32))
    (root / "f001.npy").write_bytes(b"\x93NUMPY garbage")
    argv = npy_train_args(root, tmp_path / "bad", "--max-steps", "2", "--mesh", "1x2x1")
    for msg in run_ranks(2, train_runs.error, "mae", argv, timeout=120):
        assert "f001.npy" in msg and msg.startswith("ValueError"), msg
    skipping = npy_train_args(root, tmp_path / "skip", "--max-steps", "2", "--mesh", "1x2x1", "--data.skip-bad-files")
    out = run_ranks(2, train_runs.run, "mae", skipping)
    assert out[0]["steps"] == 2
    index = json.loads((tmp_path / "skip" / "data" / "index.json").read_text())
    assert len(index["datasets"]["npy"]["entries"]) == 3
