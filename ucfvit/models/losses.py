"""Task losses shared by families. Each is a mean over samples, so splitting a batch over ranks
or micro-batches changes nothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dice_losses", "segmentation_loss", "segmentation_losses"]


def dice_losses(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per sample (B,): 1 - soft Dice, averaged over classes. logits (B, K, *S), target (B, *S)."""
    probs = logits.float().softmax(dim=1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = tuple(range(2, probs.ndim))
    inter = (probs * onehot).sum(dims)
    union = probs.sum(dims) + onehot.sum(dims)
    return (1 - (2 * inter + eps) / (union + eps)).mean(dim=1)


def segmentation_losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sample (B,): mean per-pixel cross-entropy plus soft Dice; logits (B, K, *S), target (B, *S)."""
    cross_entropy = F.cross_entropy(logits.float(), target, reduction="none").flatten(1).mean(dim=1)
    return cross_entropy + dice_losses(logits, target)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean over samples of :func:`segmentation_losses`."""
    return segmentation_losses(logits, target).mean()
