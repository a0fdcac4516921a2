"""Complete recipes per model family, chosen by ``--model`` (and sized for the device at hand).

Every value is only a default: ``tyro`` parses the command line on top of the preset, so
``--model mae --optim.lr 3e-4 --mesh 1x4x2`` overrides exactly those fields.
"""

from __future__ import annotations

import torch

from .config import ArchConfig, Config, DataConfig, MetricsConfig, OptimConfig, ParallelConfig, ScheduleConfig

__all__ = ["preset"]

FAMILIES = ("vit", "mae", "unetr", "sap", "diffusion")


def preset(model: str, model_size: str | None = None, accelerator: bool | None = None) -> Config:
    """The recipe of ``model``. On CPU: a debug-size model on 32x32 images that learns visibly in
    about a minute; on a GPU: ViT-Base sized runs on 224x224 images in bf16."""
    if model not in FAMILIES:
        raise ValueError(f"--model {model!r} is unknown; choose one of {list(FAMILIES)}")
    accelerator = torch.cuda.is_available() if accelerator is None else accelerator
    if accelerator:
        cfg = Config(
            model=model, model_size=model_size or "base", max_steps=1000,
            arch=ArchConfig(img_size=(224, 224), num_classes=3),
            data=DataConfig(global_batch_size=256),
            optim=OptimConfig(lr=1.5e-4, lr_scaling="linear"),
            schedule=ScheduleConfig(warmup_steps=100),
            parallel=ParallelConfig(param_dtype="bfloat16"),
            metrics=MetricsConfig(log_every=10),
        )  # fmt: skip
    else:
        cfg = Config(
            model=model, model_size=model_size or "debug", max_steps=60,
            arch=ArchConfig(img_size=(32, 32), num_classes=3),
            data=DataConfig(global_batch_size=16),
            optim=OptimConfig(lr=2e-3),
            schedule=ScheduleConfig(warmup_steps=5),
            metrics=MetricsConfig(log_every=2),
        )  # fmt: skip
    if accelerator and model_size not in ("huge", "giant"):
        cfg.arch.patch_size = 16  # also for --model-size debug, whose patch 4 would give 3136 tokens at 224 px
    return cfg
