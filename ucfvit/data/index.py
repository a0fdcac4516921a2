"""The file/tile index of a dataset: every file's channels and shape, and the tiles cut from it.

Building it reads one header per file, which on a parallel file system at thousands of ranks is a
metadata storm; so one process builds it (the trainer's rank 0), writes it as JSON next to the run
(``<run.dir>/data/index.json``), and every rank reads that file. The index is reused while the
options that shape it (kind, root, labels, split, tiling, model input size) stay the same; delete
the file after adding or removing data files.

A sample of a file dataset is a tile: sample ``k`` is tile ``k - first[i]`` of file ``i``, tiles
numbered row-major over the per-axis tile starts of :func:`ucfvit.data.tiling.tile_starts`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ucfvit.files import MIB, read_bounded

from .config import DatasetConfig
from .readers import DataError, Item, Reader
from .tiling import split_range, tile_starts

__all__ = ["INDEX_VERSION", "SourceIndex", "build_index", "fingerprint", "load_index", "save_index", "tile_extent"]

INDEX_VERSION = 1
INDEX_LIMIT = 1024 * MIB  # the largest index read: some 5 million files


def tile_extent(cfg: DatasetConfig, img_size: Sequence[int], file_ndim: int, path: str) -> tuple[int, ...] | None:
    """The tile per axis of a file with ``file_ndim`` spatial axes (a slice axis has extent 1), or
    None for whole images resized to the model's size (``imagefolder`` without ``--data.tile``)."""
    model_ndim = len(img_size)
    tile = tuple(cfg.tile) if cfg.tile is not None else tuple(img_size)
    if cfg.slice_axis is not None:
        if file_ndim != 3 or model_ndim != 2:
            raise DataError(
                f"{path}: --data.slice-axis {cfg.slice_axis} cuts 2D slices from 3D volumes for a 2D model; the file "
                f"has {file_ndim} spatial axes and the model {model_ndim} (--arch.img-size)"
            )
        return tile[: cfg.slice_axis] + (1,) + tile[cfg.slice_axis :]
    if file_ndim != model_ndim:
        hint = " (use --data.slice-axis to train a 2D model on slices)" if (file_ndim, model_ndim) == (3, 2) else ""
        raise DataError(
            f"{path}: the file has {file_ndim} spatial axes, the model takes {model_ndim}D input "
            f"(--arch.img-size {' '.join(map(str, img_size))}){hint}"
        )
    if cfg.tile is None and cfg.kind == "imagefolder":
        return None
    return tile


def axis_starts(cfg: DatasetConfig, shape: Sequence[int], tile: Sequence[int] | None, path: str) -> list[np.ndarray]:
    """Tile start positions per spatial axis of a file of ``shape`` (one start per axis for whole images)."""
    if tile is None:
        return [np.zeros(1, dtype=np.int64) for _ in shape]
    starts = []
    for axis, (length, extent) in enumerate(zip(shape, tile, strict=True)):
        if length < extent:
            if cfg.pad_value is None:
                raise DataError(
                    f"{path}: axis {axis} has {length} pixels, fewer than the tile's {extent} (shape "
                    f"{tuple(shape)}, tile {tuple(tile)}); use a smaller --data.tile or pad with --data.pad-value"
                )
            starts.append(np.zeros(1, dtype=np.int64))
        elif cfg.slice_axis == axis:
            starts.append(np.arange(length, dtype=np.int64))
        else:
            starts.append(tile_starts(length, extent, cfg.tile_overlap, cfg.use_all_data))
    return starts


@dataclass
class SourceIndex:
    """The index of one file dataset.

    Attributes:
        name: the dataset's name.
        entries: per file: ``path``, ``label`` (class or None), ``mask`` (path or None), ``channels``, ``shape``.
        tiles: tiles per file.
        classes: class names of an image-folder tree (index = label), else None.
        saved_as: the index file this was read from (None: built in this process).
    """

    name: str
    entries: list[dict]
    tiles: list[int]
    classes: list[str] | None = None
    saved_as: str | None = field(default=None, compare=False)  # the index file it was read from, if any
    _first: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self._first = np.concatenate([[0], np.cumsum(self.tiles, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self._first[-1])

    def locate(self, k: int) -> tuple[int, int]:
        """(file number, tile number in that file) of sample ``k``."""
        if not 0 <= k < len(self):
            raise IndexError(f"sample {k} is outside dataset {self.name!r} of {len(self)} samples")
        i = int(np.searchsorted(self._first, k, side="right")) - 1
        return i, k - int(self._first[i])

    def item(self, i: int) -> Item:
        e = self.entries[i]
        return Item(e["path"], e["label"], e["mask"])

    @property
    def channels(self) -> int:
        return self.entries[0]["channels"]

    def to_dict(self) -> dict:
        return {"name": self.name, "entries": self.entries, "tiles": self.tiles, "classes": self.classes}

    @classmethod
    def from_dict(cls, data: dict) -> SourceIndex:
        return cls(data["name"], data["entries"], data["tiles"], data.get("classes"))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _split(items: list[Item], split: Sequence[float]) -> list[Item]:
    """The ``split`` fraction of the files of each directory (e.g. each class folder), in name order."""
    by_dir: dict[str, list[Item]] = {}
    for item in items:
        by_dir.setdefault(os.path.dirname(item.path), []).append(item)
    kept = []
    for group in by_dir.values():
        kept += [group[i] for i in split_range(len(group), split[0], split[1])]
    return kept


def build_index(
    name: str, cfg: DatasetConfig, reader: Reader, img_size: Sequence[int], skip_bad_files: bool = False
) -> SourceIndex:
    """Read every file's header (and its mask's) and count its tiles.

    Raises :class:`~ucfvit.data.readers.DataError` naming the file for an unreadable file, a
    channel count that differs from the first file's, a mask whose shape differs from its image,
    or a file smaller than a tile without ``--data.pad-value``; with ``skip_bad_files`` an
    unreadable file is logged and left out instead.
    """
    items = _split(reader.items(Path(cfg.root), Path(cfg.labels) if cfg.labels is not None else None), cfg.split)
    if not items:
        raise DataError(
            f"dataset {name!r}: --data.split {cfg.split[0]} {cfg.split[1]} keeps no file of {cfg.root}; widen the split"
        )
    entries, tiles, skipped = [], [], 0
    for item in items:
        try:
            channels, shape = reader.header(item)
            if item.mask is not None:
                _, mask_shape = reader.header(Item(item.mask))
                if tuple(mask_shape) != tuple(shape):
                    raise DataError(
                        f"{item.mask}: label shape {tuple(mask_shape)} differs from its image {item.path} "
                        f"{tuple(shape)} (--data.labels)"
                    )
        except DataError as err:
            if not skip_bad_files:
                raise
            skipped += 1
            _log(f"ucfvit: skipping {item.path} (--data.skip-bad-files): {err}")
            continue
        if entries and channels != entries[0]["channels"]:
            raise DataError(
                f"{item.path}: {channels} channel(s), but {entries[0]['path']} has {entries[0]['channels']}; "
                f"the files of dataset {name!r} (--data.root {cfg.root}) must agree"
            )
        extent = tile_extent(cfg, img_size, len(shape), item.path)
        count = int(np.prod([len(s) for s in axis_starts(cfg, shape, extent, item.path)]))
        entries.append(
            {"path": item.path, "label": item.label, "mask": item.mask, "channels": channels, "shape": list(shape)}
        )
        tiles.append(count)
    if not entries:
        raise DataError(f"dataset {name!r}: every file of {cfg.root} was skipped as unreadable (--data.skip-bad-files)")
    classes = reader.classes(Path(cfg.root)) if hasattr(reader, "classes") else None
    return SourceIndex(name, entries, tiles, classes or None)


def fingerprint(datasets: dict[str, DatasetConfig], img_size: Sequence[int], skip_bad_files: bool) -> dict:
    """The options an index depends on; a cached index is reused only if they are equal."""
    keys = ("kind", "root", "labels", "tile", "tile_overlap", "use_all_data", "slice_axis", "pad_value", "split")
    return {
        "version": INDEX_VERSION,
        "img_size": list(img_size),
        "skip_bad_files": skip_bad_files,
        "datasets": {
            n: {k: str(Path(v).resolve()) if isinstance(v, Path) else v for k in keys for v in [getattr(c, k)]}
            for n, c in datasets.items()
        },
    }


def save_index(path: Path, key: dict, indexes: dict[str, SourceIndex]) -> None:
    """Write the index atomically (a temporary file renamed over the old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"key": key, "datasets": {n: i.to_dict() for n, i in indexes.items()}}))
    os.replace(tmp, path)


def load_index(path: Path, key: dict) -> dict[str, SourceIndex] | None:
    """The saved index if it exists and was built with options ``key`` (else None: build it again).

    Raises :class:`DataError` naming ``path`` when it is no regular file (a FIFO would block the
    reader) or larger than :data:`INDEX_LIMIT`: not an index the trainer wrote.
    """
    if not os.path.lexists(path):
        return None
    try:
        raw = read_bounded(path, INDEX_LIMIT, "the cached data index", DataError)
    except DataError as err:
        raise DataError(f"{err}; delete it, and the index is built again") from None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None  # a torn write: build it again
    if not isinstance(data, dict) or data.get("key") != json.loads(json.dumps(key)):
        return None
    try:
        indexes = {n: SourceIndex.from_dict(d) for n, d in data["datasets"].items()}
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    for index in indexes.values():
        index.saved_as = str(path)
    return indexes
