"""Tile positions in 2D and 3D, and the per-directory train/val/test split of a file list.

An image or volume larger than the model's input is cut into tiles of the model's size. Along each
axis the tiles start at 0, step, 2*step, ... while they fit, with ``step = tile - round(overlap *
tile)``; ``use_all_data`` adds one tile that ends exactly at the border when the last regular tile
stops short of it (UCF-VIT's meaning). A grid of tiles is the product of the per-axis starts.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np

__all__ = ["count_tiles", "split_range", "tile_grid", "tile_starts"]


def _int(value, what: str) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, not {value!r}") from None


def _step(tile: int, overlap: float) -> int:
    """Distance between tile starts: ``tile`` less the overlap (rounded to the nearest pixel, halves up), at least 1."""
    if not 0.0 <= overlap < 1.0:  # also refuses NaN
        raise ValueError(f"--data.tile-overlap must be in [0, 1), not {overlap!r}")
    # round(x, 9) first so that e.g. 0.3 * 10 = 3.0000000000000004 counts as 3 and 0.35 * 10 as 3.5.
    return max(1, tile - math.floor(round(overlap * tile, 9) + 0.5))


def _check(length, tile, overlap: float) -> tuple[int, int, int]:
    length, tile = _int(length, "length"), _int(tile, "tile")
    if tile <= 0:
        raise ValueError(f"tile size must be positive, not {tile}")
    if length < 0:
        raise ValueError(f"length must be non-negative, not {length}")
    return length, tile, _step(tile, overlap)


def tile_starts(length: int, tile: int, overlap: float = 0.0, use_all_data: bool = False) -> np.ndarray:
    """Start positions (int64) of the tiles along an axis of ``length``; empty if ``length < tile``.

    Starts are 0, step, 2*step, ... while ``start + tile <= length``; with ``use_all_data`` a last
    tile starting at ``length - tile`` is added when the regular ones do not reach the border.
    """
    length, tile, step = _check(length, tile, overlap)
    if length < tile:
        return np.zeros(0, dtype=np.int64)
    starts = np.arange(0, length - tile + 1, step, dtype=np.int64)
    if use_all_data and starts[-1] + tile < length:
        starts = np.append(starts, np.int64(length - tile))
    return starts


def _count_1d(length: int, tile: int, overlap: float, use_all_data: bool) -> int:
    length, tile, step = _check(length, tile, overlap)
    if length < tile:
        return 0
    regular = (length - tile) // step + 1
    return regular + int(use_all_data and (length - tile) % step != 0)


def _axes(shape: Sequence[int], tile: Sequence[int]) -> tuple[tuple, tuple]:
    shape, tile = tuple(shape), tuple(tile)
    if len(shape) != len(tile) or not shape:
        raise ValueError(f"shape {shape} and tile {tile} must have the same, non-zero number of axes")
    return shape, tile


def tile_grid(
    shape: Sequence[int], tile: Sequence[int], overlap: float = 0.0, use_all_data: bool = False
) -> np.ndarray:
    """(n, ndim) int64 start corners of every tile of ``shape``: the product of per-axis starts, last axis fastest."""
    shape, tile = _axes(shape, tile)
    starts = [tile_starts(length, t, overlap, use_all_data) for length, t in zip(shape, tile, strict=True)]
    if any(len(s) == 0 for s in starts):
        return np.zeros((0, len(shape)), dtype=np.int64)
    mesh = np.meshgrid(*starts, indexing="ij")
    return np.stack([m.reshape(-1) for m in mesh], axis=1)


def count_tiles(shape: Sequence[int], tile: Sequence[int], overlap: float = 0.0, use_all_data: bool = False) -> int:
    """``len(tile_grid(shape, tile, overlap, use_all_data))``, computed without building the grid."""
    shape, tile = _axes(shape, tile)
    return math.prod(_count_1d(length, t, overlap, use_all_data) for length, t in zip(shape, tile, strict=True))


def split_range(n: int, start: float, end: float) -> range:
    """Items ``[floor(n*start), floor(n*end))`` of ``n``: one of the train/val/test fractions of a directory.

    Consecutive fractions, e.g. (0, .8), (.8, .9), (.9, 1), partition ``range(n)``. Products within
    1e-9 of a whole number count as that number (so 0.29 * 100 gives 29, not 28).
    """
    n = _int(n, "n")
    if n < 0:
        raise ValueError(f"n must be non-negative, not {n}")
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"split fractions must satisfy 0 <= start < end <= 1, not start={start!r}, end={end!r}")
    return range(math.floor(round(n * start, 9)), math.floor(round(n * end, 9)))
