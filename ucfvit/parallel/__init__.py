"""Parallelism for any model over one ``ddp x fsdp x tp`` DeviceMesh (DTensor + FSDP2).

``mesh`` builds the mesh, ``plans`` holds tensor-parallel plans as data, ``parallelize`` applies
TP -> activation checkpointing -> compile -> FSDP2 (each step also usable alone), ``samples`` says
which samples and random stream a rank gets, ``shards`` which elements of a parameter it holds
(registered with ``ucfvit.models.init``, so fresh weights are the same on any mesh), ``clip`` clips
DTensor gradients exactly, and ``state_dict`` gathers a full state dict for export. ``comm_volume``
measures the bytes a step's collectives move per mesh dimension and ``cost_model`` turns them into
time on a cluster. ``comm_volume`` is imported on first use of its names: it needs
``torch.distributed.tensor.debug``, whose import pulls in torch's compiler stack (about a second
per process, which every rank of every run would otherwise pay).
"""

from typing import Any

from .clip import clip_grad_norm_
from .mesh import MESH_DIMS, MeshShape, make_mesh, mesh_device_type, parse_mesh
from .parallelize import (
    AC_MODES,
    WRAP_MODES,
    apply_ac,
    apply_compile,
    apply_fsdp,
    apply_tp,
    check_parallelizable,
    dp_mesh_of,
    parallelize,
    resolve_wrap,
)
from .plans import ModelPlan, SequenceParallelBlock, plan_for, register_plan, vit_plan
from .samples import data_parallel_info, local_batch_range, sample_rng
from .shards import local_indices
from .state_dict import full_state_dict

__all__ = [
    "AC_MODES",
    "MESH_DIMS",
    "WRAP_MODES",
    "Collective",
    "CommVolume",
    "MeshShape",
    "ModelPlan",
    "SequenceParallelBlock",
    "apply_ac",
    "apply_compile",
    "apply_fsdp",
    "apply_tp",
    "check_parallelizable",
    "clip_grad_norm_",
    "data_parallel_info",
    "dp_mesh_of",
    "full_state_dict",
    "local_batch_range",
    "local_indices",
    "make_mesh",
    "mesh_device_type",
    "parallelize",
    "parse_mesh",
    "plan_for",
    "register_plan",
    "resolve_wrap",
    "sample_rng",
    "vit_plan",
]


def __getattr__(name: str) -> Any:
    if name in ("Collective", "CommVolume"):
        from . import comm_volume

        return getattr(comm_volume, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
