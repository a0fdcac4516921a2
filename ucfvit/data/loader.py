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
prefetch); an exception in a worker is raised again on the training rank. Workers ignore the
signals that stop a run (:data:`STOP_SIGNALS`): stopping is the trainer's, which saves first.
"""

from __future__ import annotations

import ctypes
import re
import signal
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from .balance import LoadPlan
from .dataset import Source
from .order import SampleOrder
from .quadtree import adaptive_patches
from .readers import DataError

__all__ = [
    "STOP_SIGNALS",
    "StepSampler",
    "TreePatches",
    "build_loader",
    "close_workers",
    "dead_worker_error",
    "init_worker",
    "keep_freed_memory",
    "positions_at",
]

Key = tuple[int, int]  # (dataset number, stream position)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""Signals that ask a run to save and stop (preemption, Ctrl-C, a closed terminal): the trainer
handles them (:class:`ucfvit.train.guards.StopFlag`), loader workers ignore them."""


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


def init_worker(_worker_id: int | None = None) -> None:
    """Set up a loader worker: ignore :data:`STOP_SIGNALS` and keep freed memory.

    A signal sent to the process group (Ctrl-C, ``kill -TERM -PGID``, torchrun forwarding one to its
    workers) reaches the workers too. Left to their default action they would die at once, and the
    trainer, which needs them for the steps up to the next sync point, would fail with "DataLoader
    worker killed by signal" instead of saving. They end when the trainer closes the loader (or,
    should the trainer die, by the loader's own watch of their parent).
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    keep_freed_memory()


def close_workers(batches: Iterator, grace: float = 5.0) -> None:
    """End the worker processes of a loader's iterator now: asked to stop (torch joins each for up
    to 5 s), then SIGKILLed after ``grace`` more seconds.

    Workers ignore SIGTERM (:func:`init_worker`), and SIGTERM is torch's last resort for a worker
    that does not exit, and multiprocessing's at interpreter exit, which then waits for it forever.
    """
    workers = list(getattr(batches, "_workers", ()))  # torch keeps its worker processes here
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join(grace)


# How torch's loader reports a worker that died without an exception: its SIGCHLD handler, or a
# failed wait for the next batch.
_DEAD_WORKER = re.compile(
    r"DataLoader worker \(pid(?:\(s\))? (?P<pids>[\d, ]+)\) "
    r"(?:is killed by signal: (?P<signal>[^.]*)|exited unexpectedly)"
)


def _torch_reports_dead_worker(wait: float) -> re.Match | None:
    """torch's own check of the live loaders' workers (that of its SIGCHLD handler), repeated for up
    to ``wait`` seconds while the kernel finishes off a killed worker."""
    from torch.utils.data._utils.signal_handling import _error_if_any_worker_fails

    end = time.monotonic() + wait
    try:
        while time.monotonic() < end:
            _error_if_any_worker_fails()
            time.sleep(0.05)  # where the SIGCHLD handler may raise the same error
    except RuntimeError as err:
        return _DEAD_WORKER.search(str(err))
    return None


def dead_worker_error(err: BaseException, rank: int, num_workers: int) -> DataError | None:
    """The one-line :class:`DataError` for ``err`` when it comes from a loader worker that died without
    an exception (the kernel's out-of-memory killer, ``kill -9``, a full ``/dev/shm``), else None.
    Call it while the loader's iterator is alive: a worker killed while handing over a batch breaks
    the hand-over first (``ConnectionResetError``), and only its iterator knows the worker."""
    match = _DEAD_WORKER.search(str(err))
    if match is None and num_workers > 0 and isinstance(err, (ConnectionError, EOFError)):
        match = _torch_reports_dead_worker(wait=2.0)
    if match is None:
        return None
    how = f"was killed by signal {match['signal'].strip()!r}" if match["signal"] else "exited unexpectedly"
    return DataError(
        f"rank {rank}: data loader worker (pid {match['pids'].strip()}) {how}, most likely for want of memory "
        f"(the out-of-memory killer, or a full /dev/shm); lower --data.num-workers (now {num_workers}) or "
        "--data.prefetch-factor, or give the job more memory"
    )


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
        worker_init_fn=init_worker if num_workers > 0 else None,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        pin_memory=pin_memory,
    )
