"""Helpers a trainer needs around a parallelized model: which samples a rank sees, its random
stream, a gradient clip that is exact for DTensors on any mesh, and full-state-dict export."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial

from ucfvit.models.rng import SampleRNG

from .mesh import data_parallel_info

__all__ = ["local_batch_range", "sample_rng", "clip_grad_norm_", "full_state_dict"]


def local_batch_range(mesh: DeviceMesh, global_batch: int) -> range:
    """Global sample indices of this rank's share of a batch (identical within a tp group)."""
    dp_rank, dp_size = data_parallel_info(mesh)
    if global_batch % dp_size:
        raise ValueError(
            f"global batch {global_batch} is not divisible by the data-parallel size ddp*fsdp={dp_size}"
        )
    local = global_batch // dp_size
    return range(dp_rank * local, (dp_rank + 1) * local)


def sample_rng(mesh: DeviceMesh, seed: int, step: int, global_batch: int, micro_start: int = 0) -> SampleRNG:
    """The forward random stream of this rank at ``step``: keyed by (seed, step, global sample
    index), so the same on any mesh; ``micro_start`` offsets a gradient-accumulation micro-batch
    within the rank's share."""
    return SampleRNG(seed, step, local_batch_range(mesh, global_batch).start + micro_start, global_batch)


def _reduce_dims(grad: DTensor) -> tuple[int, ...]:
    """Mesh dims a gradient is split over (any shard kind, e.g. FSDP's _StridedShard under TP)."""
    if any(isinstance(p, Partial) for p in grad.placements):
        raise ValueError("clip_grad_norm_: gradients must be reduced before clipping (found a Partial DTensor)")
    return tuple(i for i, p in enumerate(grad.placements) if not p.is_replicate())


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip gradients to a global ``norm_type``-norm of ``max_norm``; returns the total norm.

    Correct for any mix of plain tensors and DTensors on different meshes (FSDP shards, TP
    shards, replicated parameters): each shard's contribution is summed locally, then summed
    over exactly the mesh dimensions it is sharded on (replicas are counted once). One
    all-reduce per distinct (mesh, sharded-dims) group.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    meshes: dict[tuple, DeviceMesh] = {}
    for g in grads:
        if isinstance(g, DTensor):
            key = (id(g.device_mesh), _reduce_dims(g))
            meshes[key] = g.device_mesh
            groups[key].append(g.to_local())
        else:
            groups[(None, ())].append(g)
    inf = norm_type == float("inf")
    total = None
    for key, tensors in groups.items():
        norms = torch.stack([torch.linalg.vector_norm(t.float(), norm_type) for t in tensors])
        part = norms.max() if inf else norms.pow(norm_type).sum()
        for dim in key[1]:
            dist.all_reduce(part, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=meshes[key].get_group(dim))
        total = part if total is None else (torch.maximum(total, part) if inf else total + part)
    total_norm = total if inf else total.pow(1.0 / norm_type)
    coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        local = g.to_local() if isinstance(g, DTensor) else g
        local.mul_(coef.to(local.device, local.dtype))
    return total_norm


def full_state_dict(model: nn.Module, *, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """Gather the unsharded model state dict on CPU (only on rank 0 if ``rank0_only``), with the
    plain module names of an unparallelized model: ready for ``safetensors`` export."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    state = get_model_state_dict(model, options=options)
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
