"""Load balancing over several datasets: which data-parallel ranks read which dataset.

Each data-parallel rank reads one dataset (a batch never mixes datasets, so datasets may differ
in channels); the ranks of a dataset form a contiguous block. Automatic plans give the ranks in
proportion to the datasets' sample (tile) counts by the D'Hondt rule, which minimises the largest
``samples / ranks`` and so the epoch length; ``--data.groups`` sets the counts by hand. Every rank
runs the same steps by construction: a dataset that runs out continues with its next epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["LoadPlan", "plan_load"]


@dataclass(frozen=True)
class LoadPlan:
    """Ranks per dataset and the epoch length they give.

    Attributes:
        names: dataset names, in order.
        samples: samples (tiles) per epoch of each dataset (None: an endless source).
        ranks: data-parallel ranks reading each dataset (contiguous blocks in this order).
        local_batch: samples per rank per step.
        manual: the ranks came from ``--data.groups``.
    """

    names: tuple[str, ...]
    samples: tuple[int | None, ...]
    ranks: tuple[int, ...]
    local_batch: int
    manual: bool = False

    @property
    def dp_size(self) -> int:
        return sum(self.ranks)

    def dataset_of(self, dp_rank: int) -> tuple[int, int]:
        """(dataset number, rank within that dataset's block) of data-parallel rank ``dp_rank``."""
        start = 0
        for d, r in enumerate(self.ranks):
            if dp_rank < start + r:
                return d, dp_rank - start
            start += r
        raise ValueError(f"data-parallel rank {dp_rank} is outside the plan's {self.dp_size} ranks")

    def steps_per_epoch(self, d: int) -> int | None:
        """Steps in which dataset ``d`` is read once by its ranks (None: endless)."""
        n = self.samples[d]
        return None if n is None else math.ceil(n / (self.ranks[d] * self.local_batch))

    @property
    def epoch_steps(self) -> int | None:
        """Steps of one epoch: until the dataset that takes longest has been read once."""
        steps = [s for s in map(self.steps_per_epoch, range(len(self.names))) if s is not None]
        return max(steps) if steps else None

    def summary(self) -> str:
        """One line: the datasets, their samples, the per-rank batch and the epoch."""
        sets = ", ".join(
            f"{n} ({s if s is not None else 'endless'})" for n, s in zip(self.names, self.samples, strict=True)
        )
        return (
            f"data: {sets}; {self.local_batch} samples per rank per step; epoch {self.epoch_steps or 'endless'} steps"
        )

    def describe(self) -> str:
        how = "--data.groups" if self.manual else "automatic"
        rows = [
            f"data plan ({how}; {self.local_batch} samples per rank per step; an epoch is "
            f"{self.epoch_steps or 'endless'} steps):"
        ]
        for d, name in enumerate(self.names):
            steps = self.steps_per_epoch(d)
            reuse = "" if steps is None or not self.epoch_steps else f", read {self.epoch_steps / steps:.2f}x per epoch"
            rows.append(
                f"  {name}: {self.samples[d] if self.samples[d] is not None else 'endless'} samples, "
                f"{self.ranks[d]} rank(s), {steps or 'endless'} steps per pass{reuse}"
            )
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {
            "names": list(self.names),
            "samples": list(self.samples),
            "ranks": list(self.ranks),
            "local_batch": self.local_batch,
            "manual": self.manual,
            "epoch_steps": self.epoch_steps,
        }


def plan_load(
    names: Sequence[str],
    samples: Sequence[int | None],
    dp_size: int,
    local_batch: int,
    groups: Sequence[int] | None = None,
) -> LoadPlan:
    """The plan for ``names`` with ``samples`` each on ``dp_size`` data-parallel ranks.

    ``groups`` (``--data.groups``) gives the ranks per dataset by hand. Raises ValueError when the
    ranks cannot cover the datasets (fewer ranks than datasets, groups that do not sum to the
    data-parallel size, an endless dataset among several without ``groups``).
    """
    names, samples = tuple(names), tuple(samples)
    if groups is not None:
        if len(groups) != len(names) or any(g < 1 for g in groups) or sum(groups) != dp_size:
            raise ValueError(
                f"--data.groups {' '.join(map(str, groups))} must give one positive rank count per dataset "
                f"({', '.join(names)}) summing to the data-parallel size ddp*fsdp={dp_size}"
            )
        return LoadPlan(names, samples, tuple(groups), local_batch, manual=True)
    if len(names) > dp_size:
        raise ValueError(
            f"{len(names)} datasets need at least {len(names)} data-parallel ranks (each rank reads one dataset), "
            f"the mesh has ddp*fsdp={dp_size}: use a mesh with more data-parallel ranks, or fewer datasets"
        )
    if len(names) > 1 and any(n is None for n in samples):
        raise ValueError("an endless dataset (synthetic) among several needs --data.groups: how many ranks read it")
    ranks = [1] * len(names)
    for _ in range(dp_size - len(names)):  # D'Hondt: the next rank to the dataset with most samples per rank
        d = max(range(len(names)), key=lambda i: (samples[i] or 0) / ranks[i])
        ranks[d] += 1
    return LoadPlan(names, samples, tuple(ranks), local_batch)
