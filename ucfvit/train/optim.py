"""AdamW and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import Config

__all__ = ["build_optimizer", "lr_at", "peak_lr"]


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


def build_optimizer(model: nn.Module, cfg: Config, device_type: str) -> torch.optim.AdamW:
    """AdamW over all parameters; fused kernels on accelerators, foreach on CPU."""
    fused = device_type == "cuda"
    return torch.optim.AdamW(
        model.parameters(),
        lr=lr_at(0, cfg),
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
        fused=fused,
        foreach=None if fused else True,
    )
