"""Procedural data that needs no files: 2D "blob" images and 3D "concrete CT" volumes.

Every sample is a pure function of (seed, global sample index), so any rank can produce any
sample, the data order is the same on every mesh, and a checkpoint's data position (a global
sample offset) means the same thing everywhere. In the spirit of UCF-VIT's basic_ct example:
volumes are a cement matrix with dense aggregate spheres (class 1) and air pores (class 2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["SyntheticImages"]

_MIX = 0x9E3779B97F4A7C15


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
        g = torch.Generator().manual_seed(seed)
        self._intensity = torch.rand(num_classes, in_chans, generator=g) * 0.3
        self._intensity[0] += 0.35
        self._intensity[1:] += torch.tensor([0.7 if k % 2 else 0.0 for k in range(1, num_classes)]).unsqueeze(1)

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        """Sample number ``index`` (any non-negative int)."""
        g = torch.Generator().manual_seed((self.seed * _MIX + index * 2654435761) & 0x7FFF_FFFF_FFFF_FFFF)
        ndim = len(self.img_size)
        seg = torch.zeros(self.img_size, dtype=torch.long)
        count = int(torch.randint(2, 7, (1,), generator=g))
        for _ in range(count):
            centre = torch.rand(ndim, generator=g) * 1.6 - 0.8
            radius = float(torch.rand(1, generator=g)) * 0.35 + 0.12
            cls = int(torch.randint(1, self.num_classes, (1,), generator=g))
            inside = ((self._grid - centre.view(-1, *([1] * ndim))) ** 2).sum(0) < radius**2
            seg[inside] = cls
        image = self._intensity[seg].movedim(-1, 0)  # (C, *img_size)
        image = image + 0.05 * torch.randn(image.shape, generator=g)
        counts = torch.bincount(seg.flatten(), minlength=self.num_classes)[1:]
        label = int(counts.argmax()) + 1 if counts.sum() > 0 else 0
        return {"image": image, "seg": seg, "label": torch.tensor(label)}

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Stacked samples for the given global indices."""
        samples = [self.sample(int(i)) for i in indices]
        return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
