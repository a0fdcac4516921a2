"""Task losses shared by families. Each is a mean over samples, so splitting a batch over ranks
or micro-batches changes nothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dice_loss", "segmentation_loss"]


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over classes, per sample, averaged over samples. logits (B, K, *S), target (B, *S)."""
    probs = logits.float().softmax(dim=1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = tuple(range(2, probs.ndim))
    inter = (probs * onehot).sum(dims)
    union = probs.sum(dims) + onehot.sum(dims)
    return (1 - (2 * inter + eps) / (union + eps)).mean(dim=1).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel cross-entropy plus soft Dice: logits (B, K, *S), target (B, *S) class indices."""
    return F.cross_entropy(logits.float(), target) + dice_loss(logits, target)
