"""AdamW and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import Config

__all__ = ["build_optimizer", "layer_scales", "lr_at", "param_groups", "peak_lr", "set_lr"]

# Parameters before the first block: layer 0 of the layer-wise decay.
_EMBEDDINGS = ("cls_token", "pos_embed", "patch_embed.", "var_embed", "var_agg.")


def peak_lr(cfg: Config) -> float:
    """``optim.lr``, times global_batch/256 with ``lr_scaling=linear``."""
    scale = cfg.data.global_batch_size / 256 if cfg.optim.lr_scaling == "linear" else 1.0
    return cfg.optim.lr * scale


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear from ``warmup_start_lr`` to the peak
    over ``warmup_steps``, then cosine down to ``min_lr`` at ``max_steps``."""
    peak, sched = peak_lr(cfg), cfg.schedule
    if step < sched.warmup_steps:
        return sched.warmup_start_lr + (peak - sched.warmup_start_lr) * step / sched.warmup_steps
    decay_steps = max(1, cfg.max_steps - sched.warmup_steps)
    progress = min(1.0, (step - sched.warmup_steps) / decay_steps)
    return sched.min_lr + 0.5 * (peak - sched.min_lr) * (1 + math.cos(math.pi * progress))


def layer_scales(model: nn.Module, layer_decay: float) -> dict[str, float]:
    """Learning-rate scale per parameter name: ``layer_decay**(depth + 1 - layer)`` with layer 0 the
    embeddings, ``i + 1`` encoder block ``i`` and ``depth + 1`` everything after the blocks."""
    depth = getattr(model, "depth", None)
    if layer_decay != 1.0 and not isinstance(depth, int):
        raise ValueError(
            f"--optim.layer-decay {layer_decay} needs a model with encoder blocks named blocks.N and a `depth`"
        )
    scales = {}
    for name, _ in model.named_parameters():
        if layer_decay == 1.0:
            scales[name] = 1.0
            continue
        if name.startswith(_EMBEDDINGS):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = depth + 1
        scales[name] = layer_decay ** (depth + 1 - layer)
    return scales


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups by weight decay and learning-rate scale (``lr_scale``, see :func:`layer_scales`).

    No decay for what ``model.no_weight_decay()`` names, if the model has that method (tokens,
    position and variable embeddings), and for every parameter of one dimension or less (biases,
    norm weights, LayerScale), as timm does. Frozen parameters (``requires_grad=False``) are left out.
    """
    named = getattr(model, "no_weight_decay", None)
    skip = set(named()) if callable(named) else set()
    scales = layer_scales(model, layer_decay)
    groups: dict[tuple[bool, float], dict] = {}
    for decays in (True, False):  # the two groups of the default come first, in this order
        groups[decays, 1.0] = {"params": [], "weight_decay": weight_decay if decays else 0.0, "lr_scale": 1.0}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = not (name in skip or param.ndim <= 1)
        key = (decays, scales[name])
        group = groups.setdefault(key, {"params": [], "weight_decay": weight_decay if decays else 0.0})
        group["lr_scale"] = scales[name]
        group["params"].append(param)
    return [g for (_, scale), g in groups.items() if g["params"] or scale == 1.0]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate: ``lr`` times the group's ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def build_optimizer(model: nn.Module, cfg: Config, device_type: str) -> torch.optim.AdamW:
    """AdamW (groups from :func:`param_groups`); fused kernels on accelerators, foreach on CPU."""
    fused = device_type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay),
        lr=lr_at(0, cfg),
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        fused=fused,
        foreach=None if fused else True,
    )
