"""Parallelism for any model over one ``ddp x fsdp x tp`` DeviceMesh (DTensor + FSDP2)."""

from .mesh import MESH_DIMS, MeshShape, data_parallel_info, make_mesh, mesh_device_type, parse_mesh
from .parallelize import AC_MODES, dp_mesh_of, parallelize
from .plans import ModelPlan, SequenceParallelBlock, plan_for, register_plan, vit_plan
from .utils import clip_grad_norm_, full_state_dict, local_batch_range, sample_rng

__all__ = [
    "AC_MODES", "MESH_DIMS", "MeshShape", "ModelPlan", "SequenceParallelBlock", "clip_grad_norm_",
    "data_parallel_info", "dp_mesh_of", "full_state_dict", "local_batch_range", "make_mesh",
    "mesh_device_type", "parallelize", "parse_mesh", "plan_for", "register_plan", "sample_rng", "vit_plan",
]  # fmt: skip
