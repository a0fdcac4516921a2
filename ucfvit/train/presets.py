"""Complete recipes per model family, chosen by ``--model`` (and sized for the device at hand).

A recipe is the device preset below with the family's own ``FamilySpec.recipe`` defaults on top.
Every value is only a default: ``tyro`` parses the command line on top of the recipe, so
``--model mae --optim.lr 3e-4 --mesh 1x4x2`` overrides exactly those fields.
"""

from __future__ import annotations

from typing import Any

import torch

from ucfvit.models import get_family

from .config import ArchConfig, Config, DataConfig, MetricsConfig, OptimConfig, ParallelConfig, ScheduleConfig

__all__ = ["preset", "set_dotted"]


def set_dotted(cfg: Config, path: str, value: Any) -> None:
    """Set the config field at dotted ``path`` (e.g. ``"arch.num_classes"``); unknown paths are an error."""
    *groups, name = path.split(".")
    target = cfg
    for group in groups:
        target = getattr(target, group, None)
        if target is None:
            break
    if target is None or name not in {f.name for f in target.__dataclass_fields__.values()}:
        raise ValueError(f"recipe default {path!r} names no field of the training config")
    setattr(target, name, tuple(value) if isinstance(value, list) else value)


def preset(model: str, model_size: str | None = None, accelerator: bool | None = None) -> Config:
    """The recipe of ``model``. On CPU: a debug-size model on 32x32 images that learns visibly in
    about a minute; on a GPU: ViT-Base sized runs on 224x224 images, bf16 compute over fp32 master
    weights, compiled (whole-model on a mesh that shards nothing), fused AdamW."""
    spec = get_family(model)
    accelerator = torch.cuda.is_available() if accelerator is None else accelerator
    if accelerator:
        cfg = Config(
            model=model,
            model_size=model_size or "base",
            max_steps=1000,
            arch=ArchConfig(img_size=(224, 224), in_chans=3),
            data=DataConfig(global_batch_size=256),
            optim=OptimConfig(lr=1.5e-4, lr_scaling="linear"),
            schedule=ScheduleConfig(warmup_steps=100),
            parallel=ParallelConfig(param_dtype="bfloat16", compile=True),
            metrics=MetricsConfig(log_every=10),
        )
        if cfg.model_size not in ("huge", "giant"):
            cfg.arch.patch_size = 16  # also for --model-size debug, whose patch 4 would give 3136 tokens at 224 px
    else:
        cfg = Config(
            model=model,
            model_size=model_size or "debug",
            max_steps=60,
            arch=ArchConfig(img_size=(32, 32), in_chans=3),
            data=DataConfig(global_batch_size=16),
            optim=OptimConfig(lr=2e-3),
            schedule=ScheduleConfig(warmup_steps=5),
            metrics=MetricsConfig(log_every=2),
        )
    for path, value in spec.recipe.items():
        set_dotted(cfg, path, value)
    return cfg
