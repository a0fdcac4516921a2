"""Tensor-parallel plans as data: module-name patterns -> ParallelStyle.

A pattern is a module FQN in which ``*`` stands for one name segment (``blocks.*.attn.q``
matches ``blocks.3.attn.q`` but not ``blocks.3.x.attn.q``). The built-in families share one plan
because they share module names (Megatron layout per block):

* ``attn.q/k/v`` and ``mlp.fc1`` column-wise, ``attn.proj`` and ``mlp.fc2`` row-wise: two
  all-reduces forward and two backward per block.
* ``attn`` takes its input as a replicated DTensor, so the gradients of q, k and v are summed
  locally and all-reduced once (the Megatron minimum), not three times.
* With sequence parallelism (Megatron-SP) the residual stream stays split along tokens: norms,
  residual adds and LayerScale run on sequence shards, attention/MLP inputs are all-gathered and
  their outputs reduce-scattered (two all-gathers and two reduce-scatters per block each way, the
  Megatron minimum). A block passes its sharded output straight to the next; only the blocks whose
  output the model reads as a whole sequence (the last of a stack, UNETR/SAP skip taps) gather it.
* Options of the blocks: ``attn.q_norm``/``attn.k_norm`` (qk_norm) see a slice of the heads, so
  they run on head-sharded DTensors and their weight gradients are summed over tp; LayerScale
  ``ls1``/``ls2`` run on sequence shards under sequence parallelism. ``attn`` and ``mlp`` learn
  which heads / hidden features they compute (:class:`ShardOffset`), so dropout drawn at the
  global size is sliced to the rank's part (see ``ucfvit.models.layers``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)

from ucfvit.models.encoder import VisionTransformer
from ucfvit.models.layers import Attention

__all__ = [
    "Compose",
    "ModelPlan",
    "SequenceParallelBlock",
    "ShardOffset",
    "StyleSpec",
    "check_tp_divisibility",
    "match_modules",
    "plan_for",
    "register_plan",
    "resolve_style",
    "vit_plan",
]

StyleSpec = ParallelStyle | str  # "colwise", "rowwise" or any ParallelStyle


@dataclass
class ModelPlan:
    """How to parallelize a model.

    Attributes:
        tp: pattern -> style (``"colwise"``, ``"rowwise"`` or a ParallelStyle), applied when tp > 1.
        blocks: patterns of the repeated blocks; each is one FSDP unit and gets activation
            checkpointing and compile. Everything else belongs to the root unit.
    """

    tp: dict[str, StyleSpec] = field(default_factory=dict)
    blocks: tuple[str, ...] = ()


class SequenceParallelBlock(ParallelStyle):
    """Runs a transformer block on sequence shards.

    The input is either the previous block's sharded output (a ``Shard(1)`` DTensor, used as is) or
    a full sequence (a plain tensor, replicated over tp: each rank keeps its slice, no
    communication). With ``full_output`` the output is all-gathered back to a plain tensor (for the
    model code after the block: the final norm, skip taps, pooling); otherwise it stays a ``Shard(1)``
    DTensor for the next block. A tensor ``drop_scale`` keyword becomes a replicated DTensor (so
    stochastic depth can scale sharded activations). Uneven token counts are fine (DTensor pads
    internally).
    """

    def __init__(self, full_output: bool = True):
        super().__init__()
        self.full_output = full_output

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def pre_hook(_mod, args, kwargs):
            x = args[0]
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, mesh, (Replicate(),), run_check=False).redistribute(mesh, (Shard(1),))
            scale = kwargs.get("drop_scale")
            if isinstance(scale, torch.Tensor):
                kwargs = {**kwargs, "drop_scale": DTensor.from_local(scale, mesh, (Replicate(),), run_check=False)}
            return (x, *args[1:]), kwargs

        def post_hook(_mod, _args, out):
            return out.redistribute(mesh, (Replicate(),)).to_local() if self.full_output else out

        module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        module.register_forward_hook(post_hook)
        return module


class ShardOffset(ParallelStyle):
    """Passes a module the global index of the first unit (head, hidden feature) it computes, as
    the forward keyword ``name``: ``tp rank * units(module) // tp``.

    Column-wise sharding gives tp rank r the r-th contiguous block of the units, and the model
    draws per-unit randomness (attention-dropout masks over all heads, MLP dropout over all hidden
    features) at the global size outside the block; with this offset the module keeps exactly the
    slice it computes, so every rank applies the single-process masks. The offset is plain data
    fixed when the plan is applied: the model never asks for its rank.
    """

    def __init__(self, name: str, units: Callable[[nn.Module], int]):
        super().__init__()
        self.name, self.units = name, units

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        offset = mesh.get_local_rank() * (self.units(module) // mesh.size())

        def pre_hook(_mod, args, kwargs):
            return args, {**kwargs, self.name: offset}

        module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        return module


class Compose(ParallelStyle):
    """Applies several styles to one module, in order (a plan maps each pattern to one style)."""

    def __init__(self, *styles: ParallelStyle):
        super().__init__()
        self.styles = styles

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        for style in self.styles:
            style.src_data_rank = self.src_data_rank
            module = style._apply(module, mesh)
        return module


def _heads(attn: nn.Module) -> int:
    return attn.q.weight.shape[0] // attn.head_dim  # the global shape, also on a DTensor


def _hidden(mlp: nn.Module) -> int:
    return mlp.fc1.weight.shape[0]


def block_tp_plan(
    prefix: str, sequence_parallel: bool, *, qk_norm: bool = False, layer_scale: bool = False
) -> dict[str, StyleSpec]:
    """Megatron plan inside the blocks matched by ``prefix`` (e.g. ``"blocks.*"``); ``qk_norm`` and
    ``layer_scale`` say whether those blocks have ``attn.q_norm``/``attn.k_norm`` and ``ls1``/``ls2``.
    With ``sequence_parallel`` each block itself also needs a :class:`SequenceParallelBlock` entry
    (see :func:`vit_plan`: it depends on which block outputs the model reads whole)."""
    heads, hidden = ShardOffset("head_offset", _heads), ShardOffset("hidden_offset", _hidden)
    # q/k norms see the rank's heads: dim 2 of their input (B, N, heads, head_dim) is the sharded
    # one, so the norm weights stay replicated and their gradients are summed over tp.
    head_norms = SequenceParallel(sequence_dim=2, use_local_output=True)
    extra = {f"{prefix}.attn.q_norm": head_norms, f"{prefix}.attn.k_norm": head_norms} if qk_norm else {}
    if not sequence_parallel:
        return {
            f"{prefix}.attn": Compose(
                PrepareModuleInput(
                    input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),), use_local_output=False
                ),
                heads,
            ),
            f"{prefix}.attn.q": ColwiseParallel(),
            f"{prefix}.attn.k": ColwiseParallel(),
            f"{prefix}.attn.v": ColwiseParallel(),
            f"{prefix}.attn.proj": RowwiseParallel(),
            f"{prefix}.mlp": hidden,
            f"{prefix}.mlp.fc1": ColwiseParallel(),
            f"{prefix}.mlp.fc2": RowwiseParallel(),
            **extra,
        }
    gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=False)
    if layer_scale:  # branch outputs are sequence shards: the gammas act on them as replicated DTensors
        extra.update({f"{prefix}.ls1": SequenceParallel(), f"{prefix}.ls2": SequenceParallel()})
    return {
        f"{prefix}.norm1": SequenceParallel(),
        f"{prefix}.norm2": SequenceParallel(),
        f"{prefix}.attn": Compose(gather, heads),
        f"{prefix}.attn.q": ColwiseParallel(),
        f"{prefix}.attn.k": ColwiseParallel(),
        f"{prefix}.attn.v": ColwiseParallel(),
        f"{prefix}.attn.proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        f"{prefix}.mlp": Compose(gather, hidden),
        f"{prefix}.mlp.fc1": ColwiseParallel(),
        f"{prefix}.mlp.fc2": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        **extra,
    }


_PLANS: dict[type, Callable[[nn.Module, bool], ModelPlan]] = {}


def register_plan(model_cls: type, plan_fn: Callable[[nn.Module, bool], ModelPlan]) -> None:
    """Register ``plan_fn(model, sequence_parallel) -> ModelPlan`` for instances of ``model_cls``."""
    _PLANS[model_cls] = plan_fn


def plan_for(model: nn.Module, sequence_parallel: bool = False) -> ModelPlan | None:
    """The registered plan of ``model``'s class (nearest base class wins), or None."""
    for cls in type(model).__mro__:
        if cls in _PLANS:
            return _PLANS[cls](model, sequence_parallel)
    return None


def vit_plan(model: nn.Module, sequence_parallel: bool = False) -> ModelPlan:
    """The plan of every ucfvit family: encoder ``blocks`` and, if present, ``decoder_blocks``.

    Patch embedding, variable aggregation, norms outside blocks, heads and convolutional
    decoders stay out of tensor parallelism (replicated on tp, sharded by FSDP). Block options
    (qk_norm, LayerScale) are read from the first block of each stack. Under sequence parallelism
    the last block of each stack and the encoder blocks in ``model.taps`` (UNETR/SAP skip
    connections) return full sequences; the others pass token shards to the next block.
    """
    stacks = {"blocks": model.blocks}
    if len(getattr(model, "decoder_blocks", ())):
        stacks["decoder_blocks"] = model.decoder_blocks
    tp: dict[str, StyleSpec] = {}
    for name, blocks in stacks.items():
        first = blocks[0] if len(blocks) else None
        qk_norm = first is not None and not isinstance(getattr(first.attn, "q_norm", None), (nn.Identity, type(None)))
        layer_scale = first is not None and not isinstance(getattr(first, "ls1", None), (nn.Identity, type(None)))
        tp.update(block_tp_plan(f"{name}.*", sequence_parallel, qk_norm=qk_norm, layer_scale=layer_scale))
        if sequence_parallel:
            whole = {len(blocks) - 1, *(getattr(model, "taps", ()) if name == "blocks" else ())}
            tp.update({f"{name}.{i}": SequenceParallelBlock(full_output=i in whole) for i in range(len(blocks))})
    return ModelPlan(tp=tp, blocks=tuple(f"{name}.*" for name in stacks))


register_plan(VisionTransformer, vit_plan)  # every built-in family derives from VisionTransformer


def resolve_style(style: StyleSpec) -> ParallelStyle:
    """The ParallelStyle for ``"colwise"``/``"rowwise"`` (a fresh instance), or ``style`` itself."""
    if isinstance(style, ParallelStyle):
        return style
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    if style not in styles:
        raise ValueError(f"tensor-parallel style {style!r} is unknown; use 'colwise', 'rowwise' or a ParallelStyle")
    return styles[style]()


def _pattern_regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\*", r"[^.]+") + "$")


def match_modules(model: nn.Module, patterns: Iterable[str]) -> dict[str, list[tuple[str, nn.Module]]]:
    """For each pattern, the (name, module) pairs it matches; a pattern matching nothing is an error."""
    named = list(model.named_modules())
    out: dict[str, list[tuple[str, nn.Module]]] = {}
    for pattern in patterns:
        regex = _pattern_regex(pattern)
        hits = [(n, m) for n, m in named if regex.match(n)]
        if not hits:
            examples = [n for n, _ in named if n][:6]
            raise ValueError(
                f"plan pattern {pattern!r} matches no module of {type(model).__name__}; "
                f"module names look like {examples} ('*' matches one name segment)"
            )
        out[pattern] = hits
    return out


def check_tp_divisibility(
    matches: Mapping[str, list[tuple[str, nn.Module]]], plan: Mapping[str, StyleSpec], tp: int
) -> None:
    """Raise ``ValueError`` unless ``tp`` divides every shape the plan splits: the head count of each
    matched ucfvit :class:`Attention` and the sharded dim of each column-/row-wise ``nn.Linear``.

    ``matches`` is :func:`match_modules` of the plan's patterns; needs only module shapes (meta is fine).
    """
    for pattern, hits in matches.items():
        style = plan[pattern]
        for name, module in hits:
            if isinstance(module, Attention):
                heads = module.q.out_features // module.head_dim
                if heads % tp:
                    raise ValueError(
                        f"{name} has {heads} heads: num_heads={heads} is not divisible by tp={tp}; choose tp among "
                        f"{[d for d in range(1, heads + 1) if heads % d == 0]} or another num_heads"
                    )
            if isinstance(module, nn.Linear):
                dim = module.out_features if _is_colwise(style) else module.in_features if _is_rowwise(style) else 0
                if dim % tp:
                    raise ValueError(f"{name}: dimension {dim} of a tensor-parallel Linear is not divisible by tp={tp}")


def _is_colwise(style: StyleSpec) -> bool:
    return style == "colwise" or isinstance(style, ColwiseParallel)


def _is_rowwise(style: StyleSpec) -> bool:
    return style == "rowwise" or isinstance(style, RowwiseParallel)
