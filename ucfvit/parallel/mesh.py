"""The ``ddp x fsdp x tp`` DeviceMesh: parse ``"2x2x2"``, validate it against the world size,
and build it (initialising the process group when needed).

The world comes from torchrun's env:// variables, or from SLURM's for a process that ``srun``
started directly (:mod:`ucfvit.parallel.launcher_env` translates them first)."""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.distributed_c10d import _set_pg_timeout

from .launcher_env import apply_slurm_env, slurm_task

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


def _local_gpu() -> int | None:
    """This process's GPU index: ``LOCAL_RANK`` when every local rank's GPU is visible (torchrun); for
    an srun task that sees fewer GPUs than the node has tasks (``--gpus-per-task=1 --gpu-bind``: each
    task sees only its own, as device 0) ``LOCAL_RANK`` modulo the visible count; else None (CPU)."""
    apply_slurm_env()
    if not torch.cuda.is_available():
        return None
    count, local_rank = torch.cuda.device_count(), int(os.environ.get("LOCAL_RANK", "0"))
    if count >= int(os.environ.get("LOCAL_WORLD_SIZE", "1")):
        return local_rank
    return local_rank % count if count and slurm_task(os.environ) else None


def mesh_device_type() -> str:
    """``"cuda"`` when this process has a GPU of its own (ROCm included; see ``_local_gpu``), else ``"cpu"``."""
    return "cpu" if _local_gpu() is None else "cuda"


def world_size() -> int:
    """Number of processes of this job: the process group's, else the launcher's ``WORLD_SIZE`` (1 without one)."""
    if dist.is_initialized():
        return dist.get_world_size()
    apply_slurm_env()  # before the first read of the env:// variables
    return int(os.environ.get("WORLD_SIZE", "1"))


def _init_process_group(device_type: str, timeout: datetime.timedelta | None) -> None:
    if dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    apply_slurm_env()
    if "RANK" in os.environ:  # launched by torchrun, or by srun (SLURM's variables, translated)
        kwargs = {} if timeout is None else {"timeout": timeout}
        if device_type == "cuda":
            gpu = _local_gpu() or 0
            torch.cuda.set_device(gpu)
            kwargs["device_id"] = torch.device("cuda", gpu)
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
    if device_type == "cuda" and _local_gpu() is None:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
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
