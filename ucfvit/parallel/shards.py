"""Which elements of a DTensor a rank holds, for keyed initialisation (:mod:`ucfvit.models.init`).

Model code initialises parameters without knowing about meshes: for a DTensor it asks the hook
registered here for the local part and, per dim, the global indices that part holds. Importing
``ucfvit.parallel`` registers it.

Every placement acts on one tensor dim, so a shard is the product of one index list per dim.
Each list starts as ``arange(size)`` and is split by the placements in mesh-dim order with the
placement's own split (``Shard``: ``torch.chunk``; ``_StridedShard``, which FSDP2 uses over tensor
parallelism: the right-to-left order of FSDP sharding the tp shard), which is how DTensor itself
maps a shard to global offsets (``compute_local_shape_and_global_offset``), with every offset kept
instead of the first. Uneven shards come out unpadded, as ``to_local()`` gives them.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from ucfvit.models.init import register_shard_index

__all__ = ["local_indices", "local_shard"]


def local_indices(t: DTensor) -> tuple[torch.Tensor, ...]:
    """Per dim of ``t``, the ascending global indices (int64, CPU) of this rank's shard."""
    mesh, coordinate = t.device_mesh, t.device_mesh.get_coordinate()
    indices = [torch.arange(n) for n in t.shape]
    if coordinate is None:  # not a member of the mesh: no elements
        return tuple(torch.arange(0) for _ in t.shape)
    for mesh_dim, placement in enumerate(t.placements):
        if isinstance(placement, (Shard, _StridedShard)):
            d = placement.dim
            along_d = indices[d].view([1] * d + [-1])  # split along dim d, as the placement splits t
            shards, _ = placement._split_tensor(along_d, mesh.size(mesh_dim), with_padding=False, contiguous=False)
            rank = coordinate[mesh_dim]
            indices[d] = shards[rank].reshape(-1) if rank < len(shards) else torch.arange(0)
        elif not isinstance(placement, Replicate):
            raise ValueError(f"a parameter with placement {placement} has no defined local values")
    return tuple(indices)


def local_shard(t: DTensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``t``'s local tensor (unpadded) and :func:`local_indices`; checks that they agree."""
    local, indices = t.to_local(), local_indices(t)
    if tuple(local.shape) != tuple(len(i) for i in indices):
        raise RuntimeError(
            f"the local shard of a {tuple(t.shape)} DTensor with placements {t.placements} has shape "
            f"{tuple(local.shape)}, not the {tuple(len(i) for i in indices)} its placements give"
        )
    return local, indices


register_shard_index(local_shard)
