"""The loader of one rank: which samples it reads at each step, read by worker processes.

Data-parallel rank ``q`` of dataset ``d`` (see :mod:`ucfvit.data.balance`) reads, at step ``s``,
the stream positions ``offset_d + (s - s0) * ranks_d * b + q * b + [0, b)`` of that dataset
(``b`` the samples per rank per step, ``offset_d`` the dataset's position at step ``s0``), and the
stream maps positions to samples by (seed, dataset, epoch) (:mod:`ucfvit.data.order`). So the
ranks of a tensor-parallel group, which share a data-parallel coordinate, read byte-identical
batches without a broadcast; different data-parallel ranks read disjoint samples; and with one
dataset the position is the global sample index, the same on any mesh. A checkpoint stores the
per-dataset positions (:func:`positions_at`), so a resume continues mid-epoch exactly, on any mesh.

Batches are assembled by torchdata's ``StatefulDataLoader`` (worker processes, pinned memory,
prefetch); an exception in a worker is raised again on the training rank.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from .balance import LoadPlan
from .dataset import Source
from .order import SampleOrder
from .quadtree import adaptive_patches

__all__ = ["StepSampler", "TreePatches", "build_loader", "keep_freed_memory", "positions_at"]

Key = tuple[int, int]  # (dataset number, stream position)


def positions_at(plan: LoadPlan, start: Sequence[int], start_step: int, step: int) -> list[int]:
    """Each dataset's stream position at ``step``, from its position ``start`` at ``start_step``."""
    return [p + (step - start_step) * r * plan.local_batch for p, r in zip(start, plan.ranks, strict=True)]


class StepSampler(Sampler[list[Key]]):
    """The keys of one rank's micro-batches, step after step, from ``start_step`` to ``max_steps``."""

    def __init__(self, plan: LoadPlan, dp_rank: int, start: Sequence[int], start_step: int, max_steps: int, micro: int):
        if plan.local_batch % micro:
            raise ValueError(f"micro-batch {micro} must divide the per-rank batch {plan.local_batch}")
        self.plan, self.start, self.micro = plan, list(start), micro
        self.start_step, self.max_steps = start_step, max_steps
        self.dataset, self.member = plan.dataset_of(dp_rank)
        self.done = 0  # micro-batches yielded (the sampler's state)

    @property
    def accum(self) -> int:
        return self.plan.local_batch // self.micro

    def __len__(self) -> int:
        return max(self.max_steps - self.start_step, 0) * self.accum - self.done

    def __iter__(self) -> Iterator[list[Key]]:
        d, b, micro = self.dataset, self.plan.local_batch, self.micro
        per_step = self.plan.ranks[d] * b
        total = max(self.max_steps - self.start_step, 0) * self.accum
        while self.done < total:
            step, m = divmod(self.done, self.accum)
            first = self.start[d] + step * per_step + self.member * b + m * micro
            self.done += 1
            yield [(d, first + j) for j in range(micro)]

    def state_dict(self) -> dict:
        return {"done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.done = int(state["done"])


class TreePatches:
    """Adds the quadtree/octree patch sequence of ``image`` to a sample (``patches``, ``coords``,
    ``sizes``, ``valid``; with ``separate_channels`` one tree per channel, each array with a leading
    channel axis; see :func:`ucfvit.data.quadtree.adaptive_patches`)."""

    def __init__(
        self,
        patch_size: int,
        fixed_length: int,
        min_patch: int | None,
        edge_thresholds: tuple[float, float],
        separate_channels: bool = False,
    ):
        self.patch_size, self.fixed_length, self.min_patch = patch_size, fixed_length, min_patch
        self.edge_thresholds, self.separate_channels = tuple(edge_thresholds), separate_channels

    def __call__(self, sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        seq = adaptive_patches(
            sample["image"].numpy(),
            self.patch_size,
            self.fixed_length,
            self.min_patch,
            self.edge_thresholds,
            self.separate_channels,
        )
        return {**sample, **{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in seq.items()}}

    def shared(self) -> TreePatches:
        """The same transform with one tree shared by all channels."""
        return TreePatches(self.patch_size, self.fixed_length, self.min_patch, self.edge_thresholds)


class KeyedSamples(Dataset):
    """``dataset[(d, position)]``: the sample at that stream position of source ``d``, transformed."""

    def __init__(self, sources: Sequence[Source], orders: Sequence[SampleOrder], transform: Callable | None = None):
        self.sources, self.orders, self.transform = list(sources), list(orders), transform

    def __len__(self) -> int:  # keys are not 0..n-1; the sampler gives them
        return sum(s.size or 0 for s in self.sources)

    def __getitem__(self, key: Key) -> dict[str, torch.Tensor]:
        d, position = key
        sample = self.sources[d].sample(self.orders[d](position))
        return sample if self.transform is None else self.transform(sample)


def keep_freed_memory(_worker_id: int | None = None) -> bool:
    """Let glibc's malloc keep freed memory for the next sample instead of returning it to the OS.

    Every sample allocates and frees arrays of megabytes (tiles, pyramids, patch sequences). By
    default glibc maps blocks over 128 KiB to fresh pages and unmaps them on free, so each sample
    pays a page fault per 4 KiB it touches; on a virtual machine that tripled the time of the
    adaptive patching. Blocks under 64 MiB now come from the heap, which shrinks only past 256 MiB
    free. Called in every loader worker (our own processes); False where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 64 << 20)) and bool(mallopt(m_trim_threshold, 256 << 20))


def build_loader(
    sources: Sequence[Source],
    plan: LoadPlan,
    dp_rank: int,
    start: Sequence[int],
    start_step: int,
    max_steps: int,
    micro: int,
    seed: int,
    shuffle: bool = True,
    transform: Callable | None = None,
    num_workers: int = 0,
    prefetch_factor: int = 2,
    pin_memory: bool = False,
) -> StatefulDataLoader:
    """This rank's loader: one micro-batch (a dict of stacked tensors) per iteration, in step order."""
    orders = [SampleOrder(s.size, seed, stream=d, shuffle=shuffle) for d, s in enumerate(sources)]
    return StatefulDataLoader(
        KeyedSamples(sources, orders, transform),
        batch_sampler=StepSampler(plan, dp_rank, start, start_step, max_steps, micro),
        num_workers=num_workers,
        worker_init_fn=keep_freed_memory if num_workers > 0 else None,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        pin_memory=pin_memory,
    )
