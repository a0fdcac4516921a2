"""Per-task training losses. Each is a mean over samples, so splitting a batch over ranks or
micro-batches changes nothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ucfvit.models import DDPMScheduler, grid_patches
from ucfvit.models.rng import RandomSource, rand, randn

__all__ = ["dice_loss", "task_loss"]


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over classes, per sample, averaged over samples. logits (B, K, *S), target (B, *S)."""
    probs = logits.float().softmax(dim=1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = tuple(range(2, probs.ndim))
    inter = (probs * onehot).sum(dims)
    union = probs.sum(dims) + onehot.sum(dims)
    return (1 - (2 * inter + eps) / (union + eps)).mean(dim=1).mean()


def task_loss(
    family: str, model: nn.Module, batch: dict[str, torch.Tensor], rng: RandomSource, ddpm: DDPMScheduler | None = None
) -> torch.Tensor:
    """The loss of ``family`` on ``batch`` (keys ``image``, ``seg``, ``label``):

    vit: cross-entropy on ``label``; mae: masked-patch MSE; unetr/sap: per-pixel cross-entropy +
    Dice on ``seg``; diffusion: MSE of the predicted noise at a random timestep.
    """
    x = batch["image"]
    if family == "vit":
        return F.cross_entropy(model(x, rng=rng).float(), batch["label"])
    if family == "mae":
        pred, mask = model(x, rng=rng)
        return model.loss(x, pred.float(), mask)
    if family in ("unetr", "sap"):
        logits = model(x, rng=rng) if family == "unetr" else model(*grid_patches(x, model.patch_size), rng=rng)
        return F.cross_entropy(logits.float(), batch["seg"]) + dice_loss(logits, batch["seg"])
    if family == "diffusion":
        if ddpm is None:
            raise ValueError("the diffusion loss needs a DDPMScheduler")
        t = (rand(rng, (x.shape[0],), x.device) * ddpm.num_steps).long().clamp(max=ddpm.num_steps - 1)
        noise = randn(rng, x.shape, x.device)
        pred = model(ddpm.add_noise(x, noise, t), t, rng=rng)
        return (pred.float() - noise).pow(2).flatten(1).mean(dim=1).mean()
    raise ValueError(f"model={family!r} has no loss; choose one of vit, mae, unetr, sap, diffusion")
