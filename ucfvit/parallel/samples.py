"""Which rank sees which samples, and with which random stream.

Ranks of one tp group share a data-parallel coordinate and see the same samples; sample ``i`` of
a global batch belongs to data-parallel rank ``i // local_batch``. Forward randomness is keyed by
(seed, step, global sample index) through :class:`ucfvit.models.SampleRNG`, so it is the same on
any mesh.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from ucfvit.models.rng import SampleRNG

__all__ = ["data_parallel_info", "local_batch_range", "sample_rng"]


def data_parallel_info(mesh: DeviceMesh) -> tuple[int, int]:
    """``(dp_rank, dp_size)`` of this rank over the ``ddp x fsdp`` dimensions of ``mesh``."""
    ddp, fsdp = mesh["ddp"], mesh["fsdp"]
    return ddp.get_local_rank() * fsdp.size() + fsdp.get_local_rank(), ddp.size() * fsdp.size()


def local_batch_range(mesh: DeviceMesh, global_batch: int) -> range:
    """Global sample indices of this rank's share of a batch (identical within a tp group)."""
    dp_rank, dp_size = data_parallel_info(mesh)
    if global_batch % dp_size:
        raise ValueError(f"global batch {global_batch} is not divisible by the data-parallel size ddp*fsdp={dp_size}")
    local = global_batch // dp_size
    return range(dp_rank * local, (dp_rank + 1) * local)


def sample_rng(mesh: DeviceMesh, seed: int, step: int, global_batch: int, micro_start: int = 0) -> SampleRNG:
    """The forward random stream of this rank at ``step``: keyed by (seed, step, global sample
    index), so the same on any mesh; ``micro_start`` offsets a gradient-accumulation micro-batch
    within the rank's share. Its words live on the mesh's device (see SampleRNG)."""
    device = torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" else None
    start = local_batch_range(mesh, global_batch).start + micro_start
    return SampleRNG(seed, step, start, global_batch, device=device)
