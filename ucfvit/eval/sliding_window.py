"""Sliding-window inference: a model trained on tiles applied to a whole image or volume."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from ucfvit.data.tiling import tile_starts

__all__ = ["sliding_window"]


def _weights(tile: Sequence[int], kind: str, device, dtype) -> torch.Tensor:
    """Blending weights of one tile: ones, or a Gaussian with sigma = tile/8 per axis (as nnU-Net)."""
    if kind == "uniform":
        return torch.ones(tuple(tile), device=device, dtype=dtype)
    if kind != "gaussian":
        raise ValueError(f"weights={kind!r}: choose 'gaussian' or 'uniform'")
    out = torch.ones((), device=device, dtype=dtype)
    for side in tile:
        x = torch.arange(side, device=device, dtype=dtype) - (side - 1) / 2
        g = torch.exp(-(x**2) / (2 * (side / 8) ** 2))
        out = out.unsqueeze(-1) * (g / g.max())
    return out


@torch.no_grad()
def sliding_window(
    fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    tile: Sequence[int],
    overlap: float = 0.5,
    weights: Literal["gaussian", "uniform"] = "gaussian",
    batch_size: int = 4,
) -> torch.Tensor:
    """``fn`` applied to tiles of ``image`` (B, C, *S) and blended into a (B, C_out, *S) output.

    Tiles of size ``tile`` start every ``tile * (1 - overlap)`` pixels per axis, the last one backed
    up against the border so every pixel is covered (a side smaller than its tile is an error:
    pad the image first). ``fn`` maps (N, C, *tile) to (N, C_out, *tile); overlapping predictions
    are averaged with ``weights``. ``batch_size`` tiles run per call.
    """
    spatial = tuple(image.shape[2:])
    tile = tuple(int(t) for t in tile)
    if len(tile) != len(spatial):
        raise ValueError(f"tile {tile} must have one size per spatial axis of the image {spatial}")
    small = [(s, t) for s, t in zip(spatial, tile, strict=True) if s < t]
    if small:
        raise ValueError(f"image {spatial} is smaller than the tile {tile} along an axis: pad it to at least the tile")
    starts = [tile_starts(s, t, overlap, use_all_data=True).tolist() for s, t in zip(spatial, tile, strict=True)]
    corners = list(itertools.product(*starts))
    out = norm = w = None
    for b in range(image.shape[0]):
        for i in range(0, len(corners), batch_size):
            chunk = corners[i : i + batch_size]
            windows = [tuple(slice(c, c + t) for c, t in zip(corner, tile, strict=True)) for corner in chunk]
            pred = fn(torch.stack([image[b][(slice(None), *win)] for win in windows]))
            if out is None:
                out = pred.new_zeros(image.shape[0], pred.shape[1], *spatial)
                norm = pred.new_zeros(spatial)
                w = _weights(tile, weights, pred.device, pred.dtype)
            for win, p in zip(windows, pred, strict=True):
                out[b][(slice(None), *win)] += p * w
                if b == 0:
                    norm[win] += w
    return out / norm
