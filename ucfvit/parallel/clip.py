"""Gradient clipping that is exact for DTensor gradients on any ``ddp x fsdp x tp`` mesh."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial

__all__ = ["clip_grad_norm_"]


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
    over exactly the mesh dimensions it is sharded on (replicas are counted once): one
    all-reduce per sharded mesh dimension of each distinct (mesh, sharded dims) group.
    Collective: every rank must call it.
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
