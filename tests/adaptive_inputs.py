"""Adaptive patch sequences for tests: a quadtree-like split of each image into one large region
(half the image side, in a corner that depends on the sample) plus regions of ``patch_size``,
every region resized to ``patch_size``, tokens in a scrambled order with the pad tokens among
them (the first sample is not split coarsely, so it has no pad tokens)."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def regions(shape, patch_size: int, corner: int) -> list[tuple[tuple[int, ...], int]]:
    """(corner, side) of the regions of one image: with ``corner`` >= 0 one region of side
    shape[0] // 2 in corner number ``corner`` (row-major), the rest of the image in patch_size cells."""
    nd, half, p = len(shape), shape[0] // 2, patch_size
    cells = list(itertools.product(*[range(0, s, p) for s in shape]))
    if corner < 0:
        return [(c, p) for c in cells]
    big = tuple(itertools.product(*[(0, half)] * nd))[corner % 2**nd]
    return [(big, half)] + [(c, p) for c in cells if not all(b <= v < b + half for v, b in zip(c, big, strict=True))]


def region_tokens(image: torch.Tensor, parts, patch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image (C, *S) cut into ``parts`` [(corner, side)] -> (patches, coords, sizes), each
    region resized to ``patch_size`` with F.interpolate (area averaging)."""
    nd = image.ndim - 1
    patches = [
        F.interpolate(
            image[(slice(None), *[slice(v, v + side) for v in corner])][None], size=[patch_size] * nd, mode="area"
        )[0]
        for corner, side in parts
    ]
    coords = torch.tensor([corner for corner, _ in parts], dtype=torch.long)
    return torch.stack(patches), coords, torch.tensor([side for _, side in parts], dtype=torch.long)


def quadtree(x: torch.Tensor, patch_size: int) -> dict[str, torch.Tensor]:
    """Batch entries of a padded PatchSequence of ``x`` (B, C, *S) with fixed_length = prod(S / patch_size)."""
    b, c, *shape = x.shape
    nd, p = len(shape), patch_size
    length = 1
    for s in shape:
        length *= s // p
    patches = x.new_zeros(b, length, c, *[p] * nd)
    coords = torch.zeros(b, length, nd, dtype=torch.long)
    sizes = torch.full((b, length), p, dtype=torch.long)
    valid = torch.zeros(b, length, dtype=torch.bool)
    for i in range(b):
        tokens, corners, sides = region_tokens(x[i], regions(shape, p, i - 1), p)
        slots = torch.randperm(length, generator=torch.Generator().manual_seed(i))[: len(sides)]
        patches[i, slots], coords[i, slots], sizes[i, slots], valid[i, slots] = tokens, corners, sides, True
    return {"patches": patches, "coords": coords, "sizes": sizes, "valid": valid}
