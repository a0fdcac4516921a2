"""Procedural data that needs no files: 2D "blob" images and 3D "concrete CT" volumes.

Every sample is a pure function of (seed, global sample index), so any rank can produce any
sample, the data order is the same on every mesh, and a checkpoint's data position (a global
sample offset) means the same thing everywhere. The randomness is the counter-based hash of
:mod:`ucfvit.models.rng` on data streams (``DATA_STREAM + k``), so it never coincides with the
model's noise even when both use the run seed. In the spirit of UCF-VIT's basic_ct example:
volumes are a cement matrix with dense aggregate spheres (class 1) and air pores (class 2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ucfvit.models.rng import DATA_STREAM, keyed_rand, keyed_randn

__all__ = ["SyntheticImages"]

# Data streams: dataset constants, per-sample shapes, per-sample pixel noise.
_INTENSITY, _SHAPES, _PIXELS = DATA_STREAM, DATA_STREAM + 1, DATA_STREAM + 2
_MAX_SHAPES = 6


class SyntheticImages:
    """Images (B, C, *img_size) with dense labels (B, *img_size) and an image label (B,).

    Pixels of class k > 0 lie inside random spheres (disks in 2D) of class k; the image label is
    the class covering most foreground pixels (0 if none). Intensities differ per class and
    channel, plus Gaussian noise, so every task (classification, reconstruction, segmentation,
    denoising) has signal to learn.
    """

    def __init__(self, img_size: Sequence[int], in_chans: int = 3, num_classes: int = 2, seed: int = 0):
        if len(img_size) not in (2, 3):
            raise ValueError(f"img_size={tuple(img_size)} must have 2 or 3 entries")
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} must be at least 2 (background + one object class)")
        self.img_size, self.in_chans, self.num_classes, self.seed = tuple(img_size), in_chans, num_classes, seed
        axes = [torch.linspace(-1, 1, s) for s in self.img_size]
        self._grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)  # (ndim, *img_size)
        # Class intensities per channel: matrix ~0.5, then alternating dense/light classes.
        self._intensity = keyed_rand(seed, 0, _INTENSITY, (1, num_classes * in_chans)).view(num_classes, in_chans) * 0.3
        self._intensity[0] += 0.35
        self._intensity[1:] += torch.tensor([0.7 if k % 2 else 0.0 for k in range(1, num_classes)]).unsqueeze(1)

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        """Sample number ``index`` (any non-negative int)."""
        if index < 0:
            raise ValueError(f"sample index {index} must be non-negative")
        ndim = len(self.img_size)
        # One uniform for the shape count, then (centre, radius, class) per shape.
        u = keyed_rand(self.seed, index, _SHAPES, (1, 1 + _MAX_SHAPES * (ndim + 2)))[0]
        seg = torch.zeros(self.img_size, dtype=torch.long)
        count = 2 + int(u[0] * (_MAX_SHAPES - 1))  # 2..6
        for params in u[1:].view(_MAX_SHAPES, ndim + 2)[:count]:
            centre = params[:ndim] * 1.6 - 0.8
            radius = float(params[ndim]) * 0.35 + 0.12
            cls = 1 + int(params[ndim + 1] * (self.num_classes - 1))
            inside = ((self._grid - centre.view(-1, *([1] * ndim))) ** 2).sum(0) < radius**2
            seg[inside] = cls
        image = self._intensity[seg].movedim(-1, 0)  # (C, *img_size)
        image = image + 0.05 * keyed_randn(self.seed, index, _PIXELS, (1, *image.shape))[0]
        counts = torch.bincount(seg.flatten(), minlength=self.num_classes)[1:]
        label = int(counts.argmax()) + 1 if counts.sum() > 0 else 0
        return {"image": image, "seg": seg, "label": torch.tensor(label)}

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Stacked samples for the given global indices."""
        samples = [self.sample(int(i)) for i in indices]
        return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
