"""AdamW and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import Config

__all__ = ["build_optimizer", "lr_at", "param_groups", "peak_lr"]


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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights, and parameters that take no weight decay.

    No decay for what ``model.no_weight_decay()`` names, if the model has that method (tokens,
    position and variable embeddings), and for every parameter of one dimension or less (biases,
    norm weights, LayerScale), as timm does.
    """
    named = getattr(model, "no_weight_decay", None)
    skip = set(named()) if callable(named) else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name in skip or param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: Config, device_type: str) -> torch.optim.AdamW:
    """AdamW (decay groups from :func:`param_groups`); fused kernels on accelerators, foreach on CPU."""
    fused = device_type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay),
        lr=lr_at(0, cfg),
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        fused=fused,
        foreach=None if fused else True,
    )
