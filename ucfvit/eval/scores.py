"""Per-sample scores of predictions (accuracy, Dice/IoU, PSNR, SSIM) on batches, plain PyTorch.

Each function returns per-sample values or integer counts, never a batch mean, so that a metric
over a sharded dataset is a sum of these and a count, all-reduced once: the same number on any
mesh as in one process (``dice_iou`` takes the summed confusion matrix).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["confusion_matrices", "confusion_matrix", "dice_iou", "psnr", "ssim", "topk_correct"]


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, torch.Tensor]:
    """Per-sample 0/1 of whether the label is among the ``k`` highest logits (B, classes), per k.
    A k above the class count counts every sample as correct."""
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
    hits = top == labels.unsqueeze(-1)
    return {k: hits[:, :k].any(dim=-1).long() for k in ks}


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts of pixels with ``target`` class i (row) predicted as j
    (column); ``pred`` and ``target`` are integer label maps of one shape."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have one shape")
    index = target.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def confusion_matrices(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per sample (B, num_classes, num_classes): :func:`confusion_matrix` of each of the B label maps."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have one shape")
    b, k = pred.shape[0], num_classes
    sample = torch.arange(b, device=pred.device).view(-1, *([1] * (pred.ndim - 1)))
    index = (sample * k * k + target.long() * k + pred.long()).reshape(-1)
    return torch.bincount(index, minlength=b * k * k).reshape(b, k, k)


def dice_iou(confusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class Dice ``2TP / (2TP + FP + FN)`` and IoU ``TP / (TP + FP + FN)`` from a confusion
    matrix (float64); NaN for a class that neither the target nor the prediction contains."""
    c = confusion.double()
    tp = c.diagonal()
    fp, fn = c.sum(0) - tp, c.sum(1) - tp
    return 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float | torch.Tensor) -> torch.Tensor:
    """Per-sample peak signal-to-noise ratio in dB, ``10 log10(range^2 / MSE)``, over all but the
    batch axis; ``data_range``: the target's value range (a number or per sample)."""
    mse = (pred.double() - target.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(torch.as_tensor(data_range, dtype=torch.float64) ** 2 / mse)


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def _filter(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' filtering of (N, 1, *S) by the 1-D window ``w`` along every spatial axis."""
    nd = x.ndim - 2
    conv = F.conv2d if nd == 2 else F.conv3d
    for axis in range(nd):
        shape = [1, 1] + [1] * nd
        shape[2 + axis] = w.numel()
        x = conv(x, w.view(shape).to(x.dtype))
    return x


def ssim(
    pred: torch.Tensor, target: torch.Tensor, data_range: float | torch.Tensor, window: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Per-sample structural similarity (Wang et al. 2004) of (B, C, *S) images, 2D or 3D: a Gaussian
    window (``window`` wide, ``sigma``), K1 = 0.01, K2 = 0.03, valid positions only, the mean over
    positions and channels; ``data_range`` a number or one per sample. Computed in float64."""
    if pred.shape != target.shape or pred.ndim not in (4, 5):
        raise ValueError(f"ssim takes two (B, C, H, W) or (B, C, D, H, W) tensors of one shape, got {pred.shape}")
    if min(pred.shape[2:]) < window:
        raise ValueError(f"ssim: every spatial side must be at least window={window}, got {tuple(pred.shape[2:])}")
    b, c = pred.shape[:2]
    x, y = (t.double().reshape(b * c, 1, *t.shape[2:]) for t in (pred, target))
    w = _gaussian(window, sigma)
    mx, my = _filter(x, w), _filter(y, w)
    vx, vy, cxy = _filter(x * x, w) - mx**2, _filter(y * y, w) - my**2, _filter(x * y, w) - mx * my
    spread = torch.as_tensor(data_range, dtype=torch.float64, device=x.device).reshape(-1).expand(b)
    spread = spread.repeat_interleave(c).view(b * c, *([1] * (x.ndim - 1)))
    c1, c2 = (0.01 * spread) ** 2, (0.03 * spread) ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.reshape(b, -1).mean(1)
