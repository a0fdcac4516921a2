"""Worker side of the multi-rank data tests: each rank builds its loader and reports digests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch.distributed as dist

from ucfvit.data.config import DataConfig, DatasetConfig
from ucfvit.data.dataset import InputSpec
from ucfvit.data.loader import build_loader
from ucfvit.data.readers import READERS
from ucfvit.parallel import data_parallel_info, make_mesh, parse_mesh
from ucfvit.parallel.mesh import world_size
from ucfvit.train.data_setup import prepare_data


def _digest(t) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def loader_digests(datasets: dict[str, str], mesh: str, run_dir: str, steps: int, global_batch: int,
                   tile: list[int], workers: int = 0) -> dict:  # fmt: skip
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
    loader = build_loader(setup.sources, setup.plan, dp_rank, [0] * len(setup.sources), 0, steps,
                          global_batch // dp_size, seed=7, num_workers=workers)  # fmt: skip
    batches = [b["image"] for b in loader]
    dataset, _ = setup.plan.dataset_of(dp_rank)
    return {
        "rank": rank, "dp_rank": dp_rank, "tp_rank": device_mesh["tp"].get_local_rank(),
        "dataset": setup.plan.names[dataset], "ranks": list(setup.plan.ranks),
        "batches": [_digest(b) for b in batches], "samples": [_digest(s) for b in batches for s in b],
        "sizes": {s.name: s.size for s in setup.sources},
    }  # fmt: skip


def _forbidden(self, item):
    raise AssertionError(f"rank {dist.get_rank()} read the header of {item.path}: only rank 0 builds the index")
