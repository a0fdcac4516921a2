"""PNG pictures of evaluation panels (:class:`ucfvit.models.tasks.Panel`), drawn with OpenCV.

One row per sample, one column per panel. Images show their first channel in grey (or three
channels as RGB), scaled by the row's first image so that every column of a row is comparable;
class maps are drawn in colour over their image; adaptive patches are outlined. A 3D volume shows
its middle slice along each axis, side by side. Small images are enlarged (nearest neighbour).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

__all__ = ["PALETTE", "draw_panels", "save_png"]

PALETTE = np.array(
    [
        (0, 0, 0),
        (230, 25, 75),
        (60, 180, 75),
        (255, 225, 25),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
    ],
    dtype=np.uint8,
)
"""RGB colour of class k (cycled); class 0, the background, is left transparent in overlays."""

_TITLE_H, _GAP, _MIN_SIDE = 22, 4, 128


def _slices(x: np.ndarray, spatial: int) -> list[np.ndarray]:
    """(..., *S) -> the 2D views to draw: itself in 2D, the middle slice along each axis in 3D."""
    if spatial == 2:
        return [x]
    return [np.take(x, x.shape[-3 + a] // 2, axis=x.ndim - 3 + a) for a in range(3)]


def _grey_or_rgb(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(C, H, W) float -> (H, W, 3) uint8 in [lo, hi]."""
    rgb = image[:3] if image.shape[0] == 3 else np.repeat(image[:1], 3, axis=0)
    scaled = (rgb - lo) / max(hi - lo, 1e-12)
    return (np.clip(np.nan_to_num(scaled), 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)


def _labels(labels: np.ndarray, under: np.ndarray | None, lo: float, hi: float) -> np.ndarray:
    colours = PALETTE[labels.astype(np.int64) % len(PALETTE)]
    if under is None:
        return colours
    base = _grey_or_rgb(under, lo, hi)
    blend = (0.45 * base + 0.55 * colours).astype(np.uint8)
    return np.where((labels > 0)[..., None], blend, base)


def _outline(picture: np.ndarray, coords: np.ndarray, sizes: np.ndarray, valid, scale: int) -> None:
    """Draw the rectangle of every valid 2D region (row, col corner; side) onto ``picture`` in place."""
    for i, ((r, c), s) in enumerate(zip(coords, sizes, strict=True)):
        if valid is not None and not valid[i]:
            continue
        top, left, side = int(r) * scale, int(c) * scale, int(s) * scale
        cv2.rectangle(picture, (left, top), (left + side - 1, top + side - 1), (255, 200, 0), 1)


def _as_numpy(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy()


def draw_panels(panels: Sequence, rows: int = 8) -> np.ndarray:
    """The picture (H, W, 3) uint8 RGB of ``panels`` (``Panel`` objects), at most ``rows`` samples."""
    if not panels:
        raise ValueError("draw_panels needs at least one panel")
    first = panels[0].data if panels[0].kind == "image" else panels[0].under
    spatial = first.ndim - 2
    count = min(rows, first.shape[0])
    side = max(first.shape[2:])
    scale = max(1, -(-_MIN_SIDE // side))  # ceil: every view at least _MIN_SIDE pixels wide
    grid = []
    for b in range(count):
        reference = _as_numpy(first[b])
        lo, hi = float(np.nanmin(reference)), float(np.nanmax(reference))
        cells = []
        for panel in panels:
            data, under = _as_numpy(panel.data[b]), _as_numpy(None if panel.under is None else panel.under[b])
            if panel.kind == "image":
                views = [_grey_or_rgb(v, lo, hi) for v in _slices(data, spatial)]
            else:
                unders = _slices(under, spatial) if under is not None else [None] * (3 if spatial == 3 else 1)
                views = [_labels(v, u, lo, hi) for v, u in zip(_slices(data, spatial), unders, strict=True)]
            views = [np.kron(v, np.ones((scale, scale, 1), dtype=np.uint8)) for v in views]
            if panel.regions is not None and spatial == 2:
                coords, sizes, valid = (_as_numpy(None if t is None else t[b]) for t in panel.regions)
                views[0] = np.ascontiguousarray(views[0])
                _outline(views[0], coords, sizes, valid, scale)
            cells.append(_hstack(views))
        grid.append(cells)
    widths = [max(row[c].shape[1] for row in grid) for c in range(len(panels))]
    header = _hstack([_title(p.title, w) for p, w in zip(panels, widths, strict=True)])
    body = [_hstack([_pad_to(cell, w) for cell, w in zip(row, widths, strict=True)]) for row in grid]
    return _vstack([header, *body])


def _title(text: str, width: int) -> np.ndarray:
    strip = np.full((_TITLE_H, width, 3), 255, dtype=np.uint8)
    cv2.putText(strip, text, (4, _TITLE_H - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def _pad_to(cell: np.ndarray, width: int) -> np.ndarray:
    return np.pad(cell, ((0, 0), (0, width - cell.shape[1]), (0, 0)), constant_values=255)


def _hstack(parts: list[np.ndarray]) -> np.ndarray:
    height = max(p.shape[0] for p in parts)
    gap = np.full((height, _GAP, 3), 255, dtype=np.uint8)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)), constant_values=255) for p in parts]
    return np.concatenate([x for p in padded for x in (p, gap)][:-1], axis=1)


def _vstack(parts: list[np.ndarray]) -> np.ndarray:
    width = max(p.shape[1] for p in parts)
    gap = np.full((_GAP, width, 3), 255, dtype=np.uint8)
    padded = [_pad_to(p, width) for p in parts]
    return np.concatenate([x for p in padded for x in (p, gap)][:-1], axis=0)


def save_png(path: str | Path, picture: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 RGB picture as PNG (the directory is created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return path
