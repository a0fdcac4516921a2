"""The ``ddp x fsdp x tp`` DeviceMesh: parse ``"2x2x2"``, validate it against the world size,
and build it (initialising the process group when needed)."""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.distributed_c10d import _set_pg_timeout

MESH_DIMS = ("ddp", "fsdp", "tp")

__all__ = ["MESH_DIMS", "MeshShape", "parse_mesh", "make_mesh", "mesh_device_type", "world_size"]


@dataclass(frozen=True)
class MeshShape:
    """Degrees of the three mesh dimensions."""

    ddp: int
    fsdp: int
    tp: int

    @property
    def world_size(self) -> int:
        return self.ddp * self.fsdp * self.tp

    @property
    def dp_size(self) -> int:
        """Data-parallel degree: ranks that see different samples."""
        return self.ddp * self.fsdp

    def __str__(self) -> str:
        return f"{self.ddp}x{self.fsdp}x{self.tp}"


def _example(world_size: int) -> str:
    """A valid mesh for ``world_size`` to quote in error messages."""
    tp = 2 if world_size % 2 == 0 and world_size > 1 else 1
    return f"1x{world_size // tp}x{tp}"


def parse_mesh(spec: str | Sequence[int] | MeshShape, world_size: int | None = None) -> MeshShape:
    """Parse ``"DxFxT"`` (or a 3-tuple) into a :class:`MeshShape`; with ``world_size``, also check
    that the product matches. Raises ``ValueError`` naming the spec and a valid example."""
    if isinstance(spec, MeshShape):
        shape = spec
    else:
        parts: Sequence
        parts = spec.lower().split("x") if isinstance(spec, str) else list(spec)
        hint = f"e.g. --mesh {_example(world_size)}" if world_size else "e.g. --mesh 1x2x2"
        try:
            values = [int(p) for p in parts]
        except (TypeError, ValueError):
            values = []
        if len(values) != 3 or any(v <= 0 for v in values):
            raise ValueError(f"mesh {spec!r} must be three positive integers ddp x fsdp x tp, {hint}")
        shape = MeshShape(*values)
    if world_size is not None and shape.world_size != world_size:
        raise ValueError(
            f"mesh {shape} has {shape.world_size} ranks but the world size is {world_size}: "
            f"ddp*fsdp*tp must equal the number of processes, e.g. --mesh {_example(world_size)}"
        )
    return shape


def mesh_device_type() -> str:
    """``"cuda"`` when every local rank can have its own GPU (ROCm included), else ``"cpu"``."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world:
        return "cuda"
    return "cpu"


def world_size() -> int:
    """Number of processes of this job: the process group's, else the launcher's ``WORLD_SIZE`` (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def _init_process_group(device_type: str, timeout: datetime.timedelta | None) -> None:
    if dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if "RANK" in os.environ:  # launched by torchrun / srun with the env:// variables
        kwargs = {} if timeout is None else {"timeout": timeout}
        if device_type == "cuda":
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            kwargs["device_id"] = torch.device("cuda", local_rank)
        dist.init_process_group(backend, **kwargs)
    else:  # a plain `python script.py`: a one-process group, no network needed
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def make_mesh(
    spec: str | Sequence[int] | MeshShape, *, device_type: str | None = None, timeout: datetime.timedelta | None = None
) -> DeviceMesh:
    """Build the 3D DeviceMesh ``("ddp", "fsdp", "tp")`` for ``spec``.

    The spec is checked against the world size (from the launcher's environment, or the existing
    process group) on every rank before any collective, so a bad mesh fails fast everywhere.
    Uses nccl on CUDA/ROCm when each local rank has a GPU, else gloo on CPU. Initialises the
    default process group if needed (a single process without a launcher gets a 1-rank group).

    ``timeout`` bounds every collective of the default group and of the mesh's dimension groups
    (a stuck one raises on gloo and aborts the process on nccl), and the rendezvous of a new group;
    None keeps torch's defaults (30 min gloo, 10 min nccl).
    """
    shape = parse_mesh(spec, world_size())
    device_type = device_type or mesh_device_type()
    if device_type == "cuda":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if torch.cuda.device_count() < local_world:
            raise ValueError(
                f"mesh {shape} asks for {local_world} GPUs per node but {torch.cuda.device_count()} are visible"
            )
    _init_process_group(device_type, timeout)
    mesh = init_device_mesh(device_type, (shape.ddp, shape.fsdp, shape.tp), mesh_dim_names=MESH_DIMS)
    if timeout is not None:
        # NOTE: init_process_group's timeout reaches only the default group: init_device_mesh makes
        # its dimension groups with torch's default timeout (measured on torch 2.13 gloo, 2x2 mesh:
        # a stalled peer blocked a sub-group all-reduce past 40 s with a 3 s process-group timeout).
        for group in {dist.group.WORLD, *mesh.get_all_groups()}:
            _set_pg_timeout(timeout, group)
    return mesh
