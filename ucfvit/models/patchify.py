"""Image <-> patch-token conversions for 2D and 3D inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange

__all__ = ["to_ntuple", "check_patch_grid", "patchify", "unpatchify"]

_SPATIAL = ("h", "w", "d")


def to_ntuple(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    """``value`` as an n-tuple of positive ints (an int is repeated); ``name`` is used in errors."""
    out = (int(value),) * n if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) != n or any(v <= 0 for v in out):
        raise ValueError(f"{name}={value!r} must be a positive int or a tuple of {n} positive ints")
    return out


def check_patch_grid(img_size: Sequence[int], patch_size: int) -> tuple[int, ...]:
    """Number of patches along each axis; raises if ``img_size`` is not a multiple of ``patch_size``."""
    if len(img_size) not in (2, 3):
        raise ValueError(f"img_size={tuple(img_size)} must have 2 (2D) or 3 (3D) entries")
    if patch_size <= 0 or any(s % patch_size for s in img_size):
        raise ValueError(
            f"img_size={tuple(img_size)} must be divisible by patch_size={patch_size} along every axis; "
            f"use e.g. img_size={tuple((s // patch_size or 1) * patch_size for s in img_size)}"
        )
    return tuple(s // patch_size for s in img_size)


def _pattern(ndim: int) -> tuple[str, str]:
    axes = _SPATIAL[:ndim]
    image = "b c " + " ".join(f"({a} p{a})" for a in axes)
    tokens = "b (" + " ".join(axes) + ") (" + " ".join(f"p{a}" for a in axes) + " c)"
    return image, tokens


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, *spatial) -> (B, N, patch_size**ndim * C), patches in row-major grid order."""
    ndim = x.ndim - 2
    image, tokens = _pattern(ndim)
    sizes = {f"p{a}": patch_size for a in _SPATIAL[:ndim]}
    return rearrange(x, f"{image} -> {tokens}", **sizes)


def unpatchify(tokens: torch.Tensor, patch_size: int, img_size: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, N, patch_size**ndim * C) -> (B, C, *img_size)."""
    ndim = len(img_size)
    grid = check_patch_grid(img_size, patch_size)
    image, pattern = _pattern(ndim)
    sizes = {f"p{a}": patch_size for a in _SPATIAL[:ndim]}
    sizes.update({a: g for a, g in zip(_SPATIAL, grid, strict=False)})  # grid has 2 or 3 axes
    return rearrange(tokens, f"{pattern} -> {image}", **sizes)
