"""The data seam: a dataset is a :class:`Source` (a length and ``sample(k)``), built by name.

``build_dataset(cfg.data, spec, seed, indexes)`` returns the run's sources by name: the synthetic
one, or one :class:`FileSource` per file dataset, which reads tiles through the reader registered
for its ``kind`` (:mod:`ucfvit.data.readers`), picks the model's channels by name, normalises and
resizes them. A new kind of data that is not a file format (a simulation, a database) is one
builder registered with :func:`register_source`; a new file format is one reader class.

Every sample is a dict of tensors: ``image`` (C, *img_size) float32, and where the data has them
``label`` () int64 (a class folder) and ``seg`` (*img_size) int64 (a label mask/volume).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from .config import DataConfig, DatasetConfig
from .index import SourceIndex, axis_starts, tile_extent
from .readers import READERS, DataError, get_reader
from .synthetic import SyntheticImages

__all__ = ["FileSource", "InputSpec", "SOURCES", "Source", "build_dataset", "dataset_configs", "register_source"]


@dataclass(frozen=True)
class InputSpec:
    """What the model takes, as the data pipeline needs to know it.

    Attributes:
        img_size: spatial input size.
        channels: channels per sample (the model's ``data_chans``).
        variables: names of those channels (the model's ``variables``).
        num_classes: classes of labels and masks the model predicts (None: it predicts none).
        needs: batch entries the family's loss reads besides ``image`` (``label``, ``seg``).
    """

    img_size: tuple[int, ...]
    channels: int
    variables: tuple[str, ...]
    num_classes: int | None = None
    needs: tuple[str, ...] = ()


class Source:
    """A dataset: ``size`` samples (None: endless) and ``sample(k)`` for ``0 <= k < size``."""

    name: str
    size: int | None

    def sample(self, k: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class SyntheticSource(Source):
    """The procedural data of :class:`~ucfvit.data.synthetic.SyntheticImages` (endless)."""

    def __init__(self, name: str, spec: InputSpec, num_classes: int, seed: int):
        self.name, self.size = name, None
        self.data = SyntheticImages(spec.img_size, spec.channels, num_classes, seed=seed)

    def sample(self, k: int) -> dict[str, torch.Tensor]:
        return self.data.sample(k)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class FileSource(Source):
    """Tiles of the files of one dataset (see :mod:`ucfvit.data.index`), in the model's channels,
    normalised as ``--data.normalize`` says."""

    def __init__(self, name: str, cfg: DatasetConfig, index: SourceIndex, spec: InputSpec, skip_bad_files: bool):
        self.name, self.cfg, self.index, self.spec = name, cfg, index, spec
        self.size = len(index)
        self.reader = get_reader(cfg.kind)(spatial_ndim=len(index.entries[0]["shape"]))
        self.skip_bad_files = skip_bad_files
        unlabelled = next((e["path"] for e in index.entries if e["label"] is None), None)
        if "label" in spec.needs and unlabelled is not None:
            raise DataError(
                f"{unlabelled}: has no class label, and the model trains on class labels: --data.root {cfg.root} "
                "must hold one sub-folder per class and no image directly in it"
            )
        classes = spec.num_classes if "label" in spec.needs else None
        beyond = next((e for e in index.entries if classes is not None and not 0 <= e["label"] < classes), None)
        if beyond is not None:
            raise DataError(
                f"{beyond['path']}: its class label {beyond['label']} is outside the model's {classes} classes "
                f"(--arch.num-classes {classes}): --data.root {cfg.root} has {len(index.classes or [])} class "
                "folders; raise --arch.num-classes, or leave it unset to take it from the folders"
            )
        self.channels = select_channels(name, cfg, index.channels, spec)
        mean, std = _fixed_stats(name, cfg, index.channels)
        ones = (1,) * len(spec.img_size)
        self.mean = None if mean is None else mean[self.channels].reshape(-1, *ones)
        self.std = None if std is None else std[self.channels].reshape(-1, *ones)
        self._geometry: dict[int, tuple] = {}

    def sample(self, k: int) -> dict[str, torch.Tensor]:
        """Sample ``k``; with ``--data.skip-bad-files`` an unreadable file is logged and the next sample
        taken, unless the data root itself is gone (then nothing could be read: one error, not a skip
        line per sample)."""
        for attempt in range(self.size if self.skip_bad_files else 1):
            try:
                return self._read((k + attempt) % self.size)
            except DataError as err:
                if not self.skip_bad_files:
                    raise
                self._check_root()
                where = f"sample {(k + attempt) % self.size} of {self.name}"
                _log(f"ucfvit: skipping {where} (--data.skip-bad-files): {err}")
        raise DataError(f"dataset {self.name!r}: no sample could be read (every file failed)")

    def _check_root(self) -> None:
        """A DataError if the dataset's root (or labels) folder is no longer there."""
        for option, path in (("--data.root", self.cfg.root), ("--data.labels", self.cfg.labels)):
            if path is not None and not os.path.isdir(path):
                raise DataError(
                    f"{path}: the folder of dataset {self.name!r} ({option}) is gone since the run started; "
                    "nothing can be read from it (restore it, or point the option at the data)"
                )

    def _check_gone(self, item) -> None:
        """After a read failed: a DataError that says so if the root, or the file or its mask, is gone
        since the index was built (the reader's own message would call the file unreadable)."""
        self._check_root()
        for path in (item.path, item.mask):
            if path is not None and not os.path.lexists(path):
                raise DataError(
                    f"{path}: the file is gone since the data index {self.index.saved_as or 'index.json'} was "
                    "built; delete that index to rebuild it from the files there are now"
                ) from None

    def _read(self, k: int) -> dict[str, torch.Tensor]:
        i, t = self.index.locate(k)
        entry, item = self.index.entries[i], self.index.item(i)
        shape = entry["shape"]
        extent, starts = self._tiles(i, item.path)
        corner = [int(s[j]) for s, j in zip(starts, np.unravel_index(t, [len(s) for s in starts]), strict=True)]
        region = (
            None
            if extent is None
            else tuple(slice(c, min(c + e, n)) for c, e, n in zip(corner, extent, shape, strict=True))
        )
        try:
            raw = self.reader.read(item, region)
        except DataError:
            self._check_gone(item)
            raise
        _check_finite(raw, item.path, region)
        expected = tuple(shape) if region is None else tuple(r.stop - r.start for r in region)
        if tuple(raw.shape[1:]) != expected or raw.shape[0] != entry["channels"]:
            raise DataError(
                f"{item.path}: read {tuple(raw.shape)} where the data index says ({entry['channels']}, "
                f"{', '.join(map(str, expected))}): the file changed since the index was built; delete "
                "<run.dir>/data/index.json to rebuild it"
            )
        image = self._fit(raw, extent, self.cfg.pad_value or 0.0)
        if self.channels != list(range(len(image))):
            image = image[self.channels]
        out = {"image": torch.from_numpy(np.ascontiguousarray(self._normalize(image, item.path)))}
        if item.mask is not None:
            try:
                mask = self._fit(self.reader.read_mask(item, region)[None], extent, 0, nearest=True)[0]
            except DataError:
                self._check_gone(item)
                raise
            classes = self.spec.num_classes
            if classes is not None and (mask.min() < 0 or mask.max() >= classes):
                raise DataError(
                    f"{item.mask}: label values {int(mask.min())}..{int(mask.max())} are outside the model's "
                    f"{classes} classes (--arch.num-classes)"
                )
            out["seg"] = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))
        if item.label is not None:
            out["label"] = torch.tensor(item.label, dtype=torch.long)
        return out

    def _tiles(self, i: int, path: str) -> tuple[tuple[int, ...] | None, list[np.ndarray]]:
        """File ``i``'s tile extent and per-axis tile starts, computed once per file."""
        if i not in self._geometry:
            shape = self.index.entries[i]["shape"]
            extent = tile_extent(self.cfg, self.spec.img_size, len(shape), path)
            self._geometry[i] = extent, axis_starts(self.cfg, shape, extent, path)
        return self._geometry[i]

    def _fit(self, x: np.ndarray, extent, pad: float, nearest: bool = False) -> np.ndarray:
        """(C, *region) -> (C, *img_size): pad a short tile, drop a slice axis, or resize a whole image."""
        if extent is None:
            return resize_image(x, self.spec.img_size, self.cfg.resize, nearest)
        short = [(0, e - n) for n, e in zip(x.shape[1:], extent, strict=True)]
        if any(after for _, after in short):
            x = np.pad(x, [(0, 0), *short], constant_values=pad)
        if self.cfg.slice_axis is not None:
            x = x.squeeze(1 + self.cfg.slice_axis)
        return x

    def _normalize(self, x: np.ndarray, path: str) -> np.ndarray:
        x = x.astype(np.float32, copy=False)
        if self.cfg.normalize == "fixed":
            return (x - self.mean) / self.std
        if self.cfg.normalize == "sample":
            axes = tuple(range(1, x.ndim))
            mean = x.mean(axis=axes, keepdims=True, dtype=np.float64)
            std = x.std(axis=axes, keepdims=True, dtype=np.float64)
            return ((x - mean) / np.maximum(std, 1e-6)).astype(np.float32)
        return x


def _check_finite(x: np.ndarray, path: str, region: tuple[slice, ...] | None) -> None:
    """A DataError naming ``path`` if ``x`` (its ``region`` as read) holds NaN or infinity: such a
    value would reach the model and be reported as a diverged run."""
    if x.dtype.kind != "f" or np.isfinite(x).all():
        return
    bad = np.argwhere(~np.isfinite(x))[0]
    starts = [0] * (len(bad) - 1) if region is None else [r.start or 0 for r in region]
    position = tuple(int(b) + s for b, s in zip(bad[1:], starts, strict=True))
    raise DataError(
        f"{path}: holds a non-finite value ({x[tuple(bad)]} in channel {bad[0]} at {position}); fix or remove "
        "the file, or skip it with --data.skip-bad-files"
    )


def resize_image(x: np.ndarray, size: Sequence[int], mode: str, nearest: bool = False) -> np.ndarray:
    """(C, H, W) -> (C, *size): ``resize`` to the size, or ``crop``: resize the short side, crop the centre.

    Shrinking averages over areas (antialiased, within the input's range), enlarging is bilinear;
    masks (``nearest``) keep their labels.
    """
    h, w = x.shape[1:]
    th, tw = size
    if mode == "crop":
        scale = max(th / h, tw / w)
        rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
    else:
        rh, rw = th, tw
    if (rh, rw) != (h, w):
        flag = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA if rh <= h and rw <= w else cv2.INTER_LINEAR
        dtype = x.dtype
        work = x.astype(np.float32) if not nearest else x.astype(np.int32)
        x = np.stack([cv2.resize(c, (rw, rh), interpolation=flag) for c in work]).astype(dtype, copy=False)
    top, left = (rh - th) // 2, (rw - tw) // 2
    return x[:, top : top + th, left : left + tw]


def select_channels(name: str, cfg: DatasetConfig, file_channels: int, spec: InputSpec) -> list[int]:
    """Which of the files' channels feed the model, in the model's order (by name when the dataset names them)."""
    if cfg.variables is not None:
        if len(cfg.variables) != file_channels:
            raise DataError(
                f"dataset {name!r}: --data.variables names {len(cfg.variables)} channel(s) "
                f"({', '.join(cfg.variables)}), its files have {file_channels}"
            )
        missing = [v for v in spec.variables if v not in cfg.variables]
        if missing:
            raise DataError(
                f"dataset {name!r}: the model's variables {', '.join(missing)} are not among the data's channels "
                f"({', '.join(cfg.variables)}); fix --data.variables or --arch.variables"
            )
        return [cfg.variables.index(v) for v in spec.variables]
    if file_channels != spec.channels:
        raise DataError(
            f"dataset {name!r}: its files have {file_channels} channel(s), the model takes {spec.channels}: use "
            f"--arch.in-chans {file_channels}, or name the channels with --data.variables to pick the model's"
        )
    return list(range(file_channels))


def _fixed_stats(name: str, cfg: DatasetConfig, channels: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    if cfg.normalize != "fixed":
        return None, None
    stats = []
    for option, values in (("--data.mean", cfg.mean), ("--data.std", cfg.std)):
        if values is None or len(values) not in (1, channels):
            raise DataError(
                f"dataset {name!r}: --data.normalize fixed needs {option} with 1 or {channels} value(s) "
                f"(one per channel of the files), got {values}"
            )
        stats.append(np.broadcast_to(np.asarray(values, dtype=np.float32), (channels,)))
    if not all(math.isfinite(s) and s > 0 for s in cfg.std):
        raise DataError(f"dataset {name!r}: --data.std {cfg.std} must be positive")
    return stats[0], stats[1]


# --------------------------------------------------------------------------------- registry
Builder = Callable[[str, DatasetConfig, InputSpec, DataConfig, int, "SourceIndex | None"], Source]


def _synthetic(name: str, cfg: DatasetConfig, spec: InputSpec, data: DataConfig, seed: int, index) -> Source:
    return SyntheticSource(name, spec, data.num_classes, seed)


def _files(name: str, cfg: DatasetConfig, spec: InputSpec, data: DataConfig, seed: int, index) -> Source:
    if index is None:
        raise ValueError(f"dataset {name!r} ({cfg.kind}) needs its file index (ucfvit.data.index.build_index)")
    return FileSource(name, cfg, index, spec, data.skip_bad_files)


SOURCES: dict[str, Builder] = {"synthetic": _synthetic}
"""Data kinds that are not file formats, by ``--data.kind`` name; file formats are the readers'."""


def register_source(kind: str, builder: Builder) -> None:
    """Make ``--data.kind KIND`` build its dataset with ``builder(name, cfg, spec, data, seed, index)``."""
    if kind in SOURCES and SOURCES[kind] is not builder:
        raise ValueError(f"data kind {kind!r} is already registered")
    SOURCES[kind] = builder


def is_file_kind(kind: str) -> bool:
    """Whether ``kind`` reads files (and so needs an index); unknown kinds raise a DataError listing the known."""
    if kind in SOURCES:
        return False
    if kind not in READERS:
        known = ", ".join([*SOURCES, *sorted(READERS)])
        raise DataError(f"--data.kind {kind!r} is unknown; choose one of {known}")
    return True


def dataset_configs(cfg: DataConfig) -> dict[str, DatasetConfig]:
    """The run's datasets by name: ``data.datasets``, or the top-level options as one dataset named by its kind."""
    return dict(cfg.datasets) if cfg.datasets else {cfg.kind: cfg}


def build_dataset(
    cfg: DataConfig, spec: InputSpec, seed: int, indexes: dict[str, SourceIndex] | None = None
) -> dict[str, Source]:
    """The run's sources by name (see the module doc); file datasets need their ``indexes``."""
    indexes = indexes or {}
    return {
        name: SOURCES.get(c.kind, _files)(name, c, spec, cfg, seed, indexes.get(name))
        for name, c in dataset_configs(cfg).items()
    }
