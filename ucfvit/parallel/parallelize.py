"""``parallelize(model, mesh)``: the one code path from a single CPU to thousands of GPUs.

Each step is a function of its own that can be used alone (as in torchtitan): :func:`apply_tp`,
:func:`apply_ac`, :func:`apply_compile`, :func:`apply_fsdp`. :func:`check_parallelizable` raises
every error :func:`parallelize` would raise for a model and a tp degree, without a mesh or a
process group, so a launcher can validate a configuration on every rank before any collective.

Order (as in torchtitan): tensor parallel -> activation checkpointing -> compile -> FSDP per
block -> FSDP on the root. TP first because FSDP shards the DTensors TP creates; AC and compile
wrap the block's forward before FSDP adds its hooks around the module call, so each block's
all-gather/reduce-scatter stays outside the compiled and recomputed region.

The units FSDP and ``torch.compile`` wrap (``wrap``): ``"blocks"`` makes each block an FSDP unit
and a compiled graph of its own, so a block's all-gather overlaps the previous block's compute
and only one block's parameters are gathered at a time. ``"model"`` makes the root the only FSDP
unit and compiles the whole forward as one graph: fusion across blocks and around them, fewer
kernel launches, one copy-in of the bf16 parameters per forward; what a mesh that shards nothing
(1x1x1, pure replication Nx1x1) wants, and ``"auto"`` picks it there (``"blocks"`` elsewhere).
Its price on a replication mesh: the gradient all-reduce runs after backward instead of
overlapping it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import parallelize_module
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .mesh import MESH_DIMS
from .plans import (
    ModelPlan,
    StyleSpec,
    check_tp_divisibility,
    match_modules,
    plan_for,
    resolve_style,
)

__all__ = [
    "AC_MODES",
    "WRAP_MODES",
    "apply_ac",
    "apply_compile",
    "apply_fsdp",
    "apply_tp",
    "check_parallelizable",
    "dp_mesh_of",
    "parallelize",
    "resolve_wrap",
]

AC_MODES = ("none", "full", "selective")
WRAP_MODES = ("auto", "model", "blocks")

# --- validation: from the model and the degrees alone --------------------------------------------


def _resolve_plan(
    model: nn.Module, plan: Mapping[str, StyleSpec] | ModelPlan | None, sequence_parallel: bool
) -> ModelPlan:
    if isinstance(plan, ModelPlan):
        return plan
    default = plan_for(model, sequence_parallel)
    if plan is None:
        if default is None:
            raise ValueError(
                f"no tensor-parallel plan is registered for {type(model).__name__}: pass plan={{'pattern': 'colwise'|"
                "'rowwise'|ParallelStyle, ...}} or register one with ucfvit.parallel.register_plan"
            )
        return default
    return ModelPlan(tp=dict(plan), blocks=default.blocks if default else ())


def _validate(
    model: nn.Module,
    tp: int,
    plan: Mapping[str, StyleSpec] | ModelPlan | None,
    blocks: Sequence[str] | None,
    sequence_parallel: bool,
    activation_checkpointing: str,
    compile: bool | str,
    wrap: str,
) -> tuple[dict[str, StyleSpec], list[nn.Module]]:
    """:func:`check_parallelizable`; returns the tensor-parallel plan and the block modules."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp={tp!r} must be a positive integer (the size of the mesh's tp dimension)")
    resolve_wrap(wrap, fsdp=1, tp=tp)  # an unknown mode is an error on any mesh
    if activation_checkpointing not in AC_MODES:
        raise ValueError(f"activation_checkpointing={activation_checkpointing!r} is unknown; choose one of {AC_MODES}")
    if compile and activation_checkpointing == "full" and tp > 1:
        # torch 2.13's AOT autograd saves a DeviceMesh among the tensors of a fully checkpointed,
        # compiled tensor-parallel block and fails; "selective" compiles fine (tested).
        raise ValueError(
            "activation_checkpointing='full' with compile=True and tp > 1 is not supported by torch 2.13; "
            "use activation_checkpointing='selective' (or compile=False)"
        )
    resolved = _resolve_plan(model, plan, sequence_parallel)
    for pattern, style in resolved.tp.items():  # an unknown style is an error on any mesh, like a bad pattern
        try:
            resolve_style(style)
        except ValueError as err:
            raise ValueError(f"plan[{pattern!r}]: {err}") from None
    tp_matches = match_modules(model, resolved.tp)  # a pattern matching nothing is an error on any mesh
    if tp > 1:
        check_tp_divisibility(tp_matches, resolved.tp, tp)
    block_patterns = tuple(blocks) if blocks is not None else resolved.blocks
    block_modules = [m for hits in match_modules(model, block_patterns).values() for _, m in hits]
    return resolved.tp, block_modules


def check_parallelizable(
    model: nn.Module,
    tp: int,
    *,
    plan: Mapping[str, StyleSpec] | ModelPlan | None = None,
    blocks: Sequence[str] | None = None,
    sequence_parallel: bool = False,
    activation_checkpointing: str = "none",
    compile: bool | str = False,
    wrap: str = "auto",
) -> None:
    """Raise the ``ValueError`` :func:`parallelize` would raise for these options on a mesh whose
    tp dimension has size ``tp`` (the mesh's dimension names aside), and return otherwise.

    Needs no DeviceMesh, no process group and no memory: ``model`` may be on the meta device. Call
    it on every rank before building the mesh so a bad head count or plan fails everywhere at once
    instead of hanging a collective. Checks: a tensor-parallel plan exists (registered or given),
    every plan style is known and every plan and block pattern matches a module (at any ``tp``),
    ``tp`` divides every head count and sharded Linear dim, the activation-checkpointing mode is
    known and is supported with ``compile``, ``wrap`` is known.
    The keyword arguments mean what they mean for :func:`parallelize`.
    """
    _validate(model, tp, plan, blocks, sequence_parallel, activation_checkpointing, compile, wrap)


def resolve_wrap(wrap: str, fsdp: int, tp: int) -> str:
    """``"model"`` or ``"blocks"``: what ``wrap`` means on a mesh with these fsdp and tp sizes
    (``"auto"``: ``"model"`` when both are 1, the mesh then sharding nothing; see the module doc)."""
    if wrap not in WRAP_MODES:
        raise ValueError(f"wrap={wrap!r} is unknown; choose one of {WRAP_MODES}")
    if wrap != "auto":
        return wrap
    return "model" if fsdp == 1 and tp == 1 else "blocks"


# --- the steps, in the order parallelize applies them ----------------------------------------------


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, plan: Mapping[str, StyleSpec] | ModelPlan) -> None:
    """Tensor-parallelize ``model`` in place over the 1-D ``tp_mesh`` following ``plan``.

    ``plan`` maps module-name patterns (``*`` = one name segment) to ``"colwise"``, ``"rowwise"`` or
    a ParallelStyle (or is a :class:`ModelPlan`, whose ``tp`` is used). Raises ``ValueError`` before
    changing anything if a pattern matches no module or the tp size does not divide a head count or
    a sharded Linear dim.
    """
    styles = plan.tp if isinstance(plan, ModelPlan) else plan
    matches = match_modules(model, styles)
    check_tp_divisibility(matches, styles, tp_mesh.size())
    for pattern, hits in matches.items():
        for _, module in hits:
            parallelize_module(module, tp_mesh, resolve_style(styles[pattern]))


# Selective AC keeps the outputs of matmuls, attention kernels and collectives and recomputes
# the cheap element-wise ops (norms, GELU, residual adds) in backward.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops._c10d_functional.all_reduce.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops._c10d_functional.all_gather_into_tensor.default,
}


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpoint_forward(block: nn.Module, mode: str) -> None:
    """Checkpoint ``block``'s forward in place (module names and state-dict keys are unchanged)."""
    inner = block.forward
    context_fn = (
        functools.partial(create_selective_checkpoint_contexts, _selective_policy) if mode == "selective" else None
    )

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        extra = {"context_fn": context_fn} if context_fn else {}
        return checkpoint(inner, *args, use_reentrant=False, **extra, **kwargs)

    block.forward = forward


def apply_ac(blocks: Iterable[nn.Module], mode: str) -> None:
    """Activation-checkpoint each of ``blocks`` in place.

    ``mode``: ``"none"`` (no-op), ``"full"`` (keep only the block's inputs, recompute the rest in
    backward) or ``"selective"`` (also keep the outputs of matmuls, attention and collectives).
    Module names and state-dict keys are unchanged, so checkpoints do not depend on the mode.
    """
    if mode not in AC_MODES:
        raise ValueError(f"activation_checkpointing={mode!r} is unknown; choose one of {AC_MODES}")
    if mode == "none":
        return
    for block in blocks:
        _checkpoint_forward(block, mode)


def apply_compile(modules: Iterable[nn.Module], backend: str | None = None) -> None:
    """``torch.compile`` the forward of each of ``modules`` in place (``backend``: default inductor),
    with static shapes: the blocks, or the root alone for a whole-model graph.

    The forward is compiled, not the module call, so the hooks FSDP adds around the call stay
    outside the graph; module names and state-dict keys are unchanged.
    """
    options = {"dynamic": False, **({"backend": backend} if backend else {})}
    for module in modules:
        # dynamic=False: encoder and decoder blocks share Block.forward, and a recompile for the
        # decoder's shapes must not switch to dynamic shapes (which fails under DTensor in torch 2.13).
        module.forward = torch.compile(module.forward, **options)


def _shard_placement(param: nn.Parameter, shards: int) -> Shard | None:
    """FSDP shards dim 0 unless it is shorter than the shard count (``pos_embed`` is (1, N, D),
    ``cls_token`` (1, 1, D)): then the longest dim, so such tensors do not land whole on rank 0,
    if the shard count divides it (FSDP pads dim 0 only; a (3, D) head on 8192 ranks stays on dim 0)."""
    if param.ndim < 2 or param.shape[0] >= shards:
        return None
    longest = max(range(param.ndim), key=lambda d: param.shape[d])
    return Shard(longest) if param.shape[longest] % shards == 0 else None


def dp_mesh_of(mesh: DeviceMesh) -> DeviceMesh:
    """The data-parallel mesh FSDP shards over, chosen so no collective runs on a size-1 group.

    ddp > 1: 2-D ``(ddp, fsdp)`` -- HSDP, or pure replication when fsdp = 1. ddp = 1: the 1-D
    ``fsdp`` mesh (a 2-D mesh would all-reduce every block over its size-1 replicate dimension);
    on 1x1x1 this is a size-1 mesh: no collective, but bf16 compute over fp32 master weights.
    """
    return mesh["ddp", "fsdp"] if mesh["ddp"].size() > 1 else mesh["fsdp"]


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    blocks: Sequence[nn.Module] = (),
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
) -> None:
    """FSDP2 ``fully_shard`` each of ``blocks``, then the root ``model`` (which takes the rest).

    ``dp_mesh`` is 1-D (FSDP, or plain replication when its size is 1) or 2-D ``(replicate, shard)``
    (HSDP); :func:`dp_mesh_of` picks it from a ``ddp x fsdp x tp`` mesh. Parameters are kept in
    fp32 and cast to ``param_dtype`` for compute; gradients are reduced in ``reduce_dtype``.
    ``reshard_after_forward`` frees gathered parameters of inner blocks after forward; the root and
    the last block always keep them (backward needs them first).
    """
    kwargs = dict(
        mesh=dp_mesh,
        mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
        shard_placement_fn=functools.partial(_shard_placement, shards=dp_mesh.size(-1)),
    )
    blocks = list(blocks)
    for i, block in enumerate(blocks):
        # The last block runs first in backward: keeping it gathered saves an all-gather.
        last = i == len(blocks) - 1
        fully_shard(block, reshard_after_forward=reshard_after_forward and not last, **kwargs)
    fully_shard(model, reshard_after_forward=False, **kwargs)


# --- all together ----------------------------------------------------------------------------------


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    plan: Mapping[str, StyleSpec] | ModelPlan | None = None,
    blocks: Sequence[str] | None = None,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype = torch.float32,
    activation_checkpointing: str = "none",
    compile: bool | str = False,
    reshard_after_forward: bool = True,
    sequence_parallel: bool = False,
    wrap: str = "auto",
) -> nn.Module:
    """Parallelize ``model`` in place over a ``("ddp", "fsdp", "tp")`` mesh and return it.

    Validates everything first (:func:`check_parallelizable`), then applies :func:`apply_tp`
    (if tp > 1), :func:`apply_ac`, :func:`apply_compile` and :func:`apply_fsdp` in that order.
    The defaults are those of plain training on one device; the GPU recipes add ``param_dtype``
    bf16 and ``compile=True``.

    Args:
        model: any module; built-in families bring their plan. Preferably on the meta device,
            then ``model.to_empty(device=...)`` and ``model.init_weights()`` afterwards.
        mesh: from :func:`ucfvit.parallel.make_mesh`.
        plan: tensor-parallel plan ``{"pattern": "colwise"|"rowwise"|ParallelStyle}`` (``*`` = one
            name segment) or a :class:`ModelPlan`; default: the registered plan of the model.
        blocks: patterns of the repeated blocks (AC; FSDP units and compile with ``wrap="blocks"``);
            default: the plan's.
        param_dtype: compute dtype of parameters (e.g. ``torch.bfloat16``) over fp32 master weights.
        reduce_dtype: gradient reduction dtype.
        activation_checkpointing: ``"none"``, ``"full"`` or ``"selective"`` (per block).
        compile: ``torch.compile`` (True, or a backend name): each block or the whole forward, as
            ``wrap`` says. With tp > 1 combine it with ``"selective"`` checkpointing: ``"full"``
            fails in torch 2.13 and is refused.
        reshard_after_forward: free gathered parameters of inner blocks after forward; the root
            and the last block always keep them (backward needs them first).
        sequence_parallel: Megatron-style sequence parallelism (tp > 1): blocks pass token shards to
            each other; see :mod:`ucfvit.parallel.plans`.
        wrap: ``"blocks"`` (an FSDP unit and a compiled graph per block), ``"model"`` (the root is
            the only unit; the whole forward is one graph) or ``"auto"``: ``"model"`` on meshes
            with fsdp = tp = 1, else ``"blocks"`` (see the module doc; :func:`resolve_wrap`).
    """
    if tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
        raise ValueError(
            f"mesh must have dimensions {MESH_DIMS} (use ucfvit.parallel.make_mesh), got {mesh.mesh_dim_names}"
        )
    tp = mesh["tp"].size()
    # Validate everything from the config alone before any collective (all ranks agree).
    tp_plan, block_modules = _validate(
        model, tp, plan, blocks, sequence_parallel, activation_checkpointing, compile, wrap
    )
    units = block_modules if resolve_wrap(wrap, mesh["fsdp"].size(), tp) == "blocks" else []
    # Order: TP -> AC -> compile -> FSDP (see the module docstring for why).
    if tp > 1:
        apply_tp(model, mesh["tp"], tp_plan)
    apply_ac(block_modules, activation_checkpointing)
    if compile:
        apply_compile(units or [model], backend=compile if isinstance(compile, str) else None)
    apply_fsdp(
        model,
        dp_mesh_of(mesh),
        units,
        param_dtype=param_dtype,
        reduce_dtype=reduce_dtype,
        reshard_after_forward=reshard_after_forward,
    )
    return model
