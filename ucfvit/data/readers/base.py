"""The reader interface, its registry, and the helpers every format shares.

A reader finds the files of a dataset (:meth:`Reader.items`), tells their channel count and spatial
shape cheaply (:meth:`Reader.header`), and reads an image or a region of it as float32 ``(C, *S)``
with raw values (:meth:`Reader.read`) or a label mask as int64 ``(*S)`` (:meth:`Reader.read_mask`).
Bad input is a :class:`DataError` whose message starts with the file it is about and names the
option to fix where one applies.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np

__all__ = ["READERS", "DataError", "Item", "Reader", "get_reader", "register_reader"]


class DataError(ValueError):
    """Bad input data; the message names the file (and the option to fix, where one applies)."""


@dataclass(frozen=True)
class Item:
    """One image or volume file of a dataset, with its class index and label-mask file if it has them."""

    path: str  # absolute path of the image/volume file
    label: int | None = None  # class index (imagefolder: index of its class sub-folder in sorted order), else None
    mask: str | None = None  # absolute path of its label mask/volume (matched by name in the labels dir), else None


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def _exists(entry: os.DirEntry) -> bool:
    """Whether ``entry`` (links followed) exists: False for a dangling link."""
    try:
        entry.stat()
    except OSError:
        return False
    return True


def check_dir(path: Path | str, option: str, what: str) -> Path:
    """``path`` made absolute, or a DataError if it is not an existing directory."""
    path = Path(os.path.abspath(os.fspath(path)))
    if not path.exists():
        raise DataError(f"{path}: the {what} does not exist; check {option}")
    if not path.is_dir():
        raise DataError(f"{path}: the {what} is not a directory; {option} must name a folder")
    return path


def as_labels(arr: np.ndarray, path: str) -> np.ndarray:
    """``arr`` as int64 class indices; float arrays must hold whole numbers."""
    kind = arr.dtype.kind
    if kind in "biu":
        return np.ascontiguousarray(arr, dtype=np.int64)
    if kind == "f":
        arr = np.asarray(arr)
        bad = ~np.isfinite(arr) | (arr != np.floor(arr))
        if bad.any():
            value = arr[bad].flat[0]
            raise DataError(f"{path}: a label mask must hold whole class indices, but it holds {value!r}")
        return np.ascontiguousarray(arr, dtype=np.int64)
    raise DataError(f"{path}: a label mask must hold integer class indices, not dtype {arr.dtype}")


def float32_c(data: np.ndarray) -> np.ndarray:
    """A (C, *S) array as a C-contiguous float32 copy, native-endian.

    Spatial axes stored first-axis-fastest (Fortran order: NIfTI, Fortran-ordered ``.npy``) are
    reordered one (first axis, last axis) plane at a time with OpenCV's blocked transpose, several
    times faster than numpy's element-wise strided copy for volumes.
    """
    strides = [abs(s) for s in data.strides]
    if data.ndim < 3 or strides[1] >= strides[-1]:
        return np.ascontiguousarray(data, dtype=np.float32)
    out = np.empty(data.shape, np.float32)
    # OpenCV reads native float32 rows in place (any row stride); anything else takes one converting copy.
    native = data.dtype == np.float32 and data.strides[1] == 4
    for c in range(data.shape[0]):
        for mid in np.ndindex(*data.shape[2:-1]):
            plane = (c, slice(None), *mid, slice(None))
            rows = data[plane].T
            out[plane] = cv2.transpose(rows if native else np.ascontiguousarray(rows, dtype=np.float32))
    return out


class Reader:
    """Base class. Subclasses set `name` (the --data.kind value) and `suffixes`, and implement the methods.

    A subclass must implement :meth:`header` and :meth:`read`; :meth:`items` (a recursive, sorted
    walk of the root with masks matched by relative path and stem) and :meth:`read_mask` (the mask
    file read with :meth:`read`, one channel, whole numbers) work for any format, and formats
    override them where they know better.
    """

    name: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]  # lower-case, e.g. (".nii", ".nii.gz")
    spatial_ndim: ClassVar[int | None]  # 2 for images, 3 for NIfTI; None: from the array (npy)

    def __init__(self, spatial_ndim: int | None = None):
        """Check a requested ``spatial_ndim`` against the format's (None: no request)."""
        fixed = getattr(type(self), "spatial_ndim", None)
        if fixed is None:  # the format does not fix it: take the caller's
            self.spatial_ndim = spatial_ndim
        elif spatial_ndim is not None and spatial_ndim != fixed:
            raise ValueError(
                f"the {self.name!r} reader reads {fixed}D data, but {spatial_ndim} spatial dimensions were asked for"
            )

    # ----------------------------------------------------------------------------------- files
    def stem(self, name: str) -> str | None:
        """``name`` without this reader's (longest matching) suffix, or None if it has none of them."""
        lower = name.lower()
        matches = [s for s in self.suffixes if lower.endswith(s) and len(name) > len(s)]
        return name[: -len(max(matches, key=len))] if matches else None

    def _walk(self, root: Path) -> Iterator[tuple[str, ...]]:
        """Relative paths (as parts) of this reader's non-hidden files under ``root``, recursively, sorted."""
        seen: set[str] = set()

        def visit(folder: Path, parts: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
            real = os.path.realpath(folder)
            if real in seen:  # a symlink loop
                return
            seen.add(real)
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if not is_hidden(e.name)), key=lambda e: e.name)
            for entry in entries:
                if entry.is_dir():
                    yield from visit(Path(entry.path), (*parts, entry.name))
                elif self.stem(entry.name) is not None and _exists(entry):
                    yield (*parts, entry.name)  # a FIFO too: header() refuses it by name, never opens it

        yield from sorted(visit(root, ()))

    def _mask_index(self, labels: Path) -> dict[tuple[tuple[str, ...], str], list[str]]:
        """(relative folder, stem) -> mask files in ``labels`` with that folder and stem."""
        index: dict[tuple[tuple[str, ...], str], list[str]] = {}
        for parts in self._walk(labels):
            key = (parts[:-1], self.stem(parts[-1]))
            index.setdefault(key, []).append(os.path.join(labels, *parts))
        return index

    def _no_files(self, root: Path) -> DataError:
        return DataError(
            f"{root}: no {self.name} files ({', '.join(self.suffixes)}) found in this folder or below; "
            "point --data.root at the folder that holds them (or pick another --data.kind)"
        )

    def _match_masks(
        self, root: Path, labels: Path | None, found: list[tuple[tuple[str, ...], int | None]]
    ) -> list[Item]:
        """Items for ``found`` (relative path parts, label), each with its mask from ``labels`` if given."""
        if labels is None:
            return [Item(os.path.join(root, *parts), label) for parts, label in found]
        labels = check_dir(labels, "--data.labels", "labels folder")
        if labels == root or root in labels.parents:
            raise DataError(
                f"{labels}: the labels folder lies inside the data root {root}, so its masks would be read as "
                "images; keep images and masks in separate folders (--data.root and --data.labels)"
            )
        index = self._mask_index(labels)
        items = []
        for parts, label in found:
            path, stem = os.path.join(root, *parts), self.stem(parts[-1])
            candidates = index.get((parts[:-1], stem), [])
            if len(candidates) > 1:  # prefer the mask with the image's own suffix
                suffix = parts[-1][len(stem) :].lower()
                same = [c for c in candidates if os.path.basename(c)[len(stem) :].lower() == suffix]
                candidates = same if len(same) == 1 else candidates
            if not candidates:
                want = os.path.join(labels, *parts[:-1], stem)
                raise DataError(
                    f"{path}: no label mask for this image in the labels folder {labels} (looked for {want} with "
                    f"one of {', '.join(self.suffixes)}); add it or fix --data.labels"
                )
            if len(candidates) > 1:
                raise DataError(f"{path}: several label masks match this image: {', '.join(candidates)}")
            items.append(Item(path, label, candidates[0]))
        return items

    def items(self, root: Path, labels: Path | None = None) -> list[Item]:
        """Every file of this format under ``root`` (recursive, sorted, hidden files skipped), masks from ``labels``."""
        root = check_dir(root, "--data.root", "data root")
        found = [(parts, None) for parts in self._walk(root)]
        if not found:
            raise self._no_files(root)
        return self._match_masks(root, labels, found)

    # ----------------------------------------------------------------------------------- data
    def slices(self, region: tuple[slice, ...] | None, ndim: int | None = None) -> tuple[slice, ...]:
        """``region`` checked to be ``ndim`` (default: ``spatial_ndim``) slices; None means everything."""
        ndim = self.spatial_ndim if ndim is None else ndim
        if ndim is None:
            raise ValueError(f"the {self.name!r} reader was made without spatial_ndim, so it cannot check a region")
        if region is None:
            return (slice(None),) * ndim
        region = tuple(region)
        if len(region) != ndim or not all(isinstance(s, slice) for s in region):
            raise ValueError(f"region {region!r} must be {ndim} slices, one per spatial axis")
        return region

    def header(self, item: Item) -> tuple[int, tuple[int, ...]]:
        """(channels, spatial shape) of ``item``'s image, without decoding all data where the format allows."""
        raise NotImplementedError

    def read(self, item: Item, region: tuple[slice, ...] | None = None) -> np.ndarray:
        """``(C, *region shape)`` float32 raw values of ``item``'s image; region: spatial slices (None: all)."""
        raise NotImplementedError

    def _mask_of(self, item: Item) -> str:
        if item.mask is None:
            raise DataError(f"{item.path}: this image has no label mask; give the labels folder with --data.labels")
        return item.mask

    def _check_mask_shape(self, item: Item, mask_shape: tuple[int, ...]) -> None:
        image_shape = tuple(self.header(item)[1])
        if tuple(mask_shape) != image_shape:
            raise DataError(
                f"{item.mask}: the label mask has shape {tuple(mask_shape)}, but its image {item.path} has spatial "
                f"shape {image_shape}; they must match (check --data.labels)"
            )

    def read_mask(self, item: Item, region: tuple[slice, ...] | None = None) -> np.ndarray:
        """``(*region shape)`` int64 class per pixel from ``item``'s mask file: one channel, the image's shape."""
        mask = Item(self._mask_of(item))
        channels, shape = self.header(mask)
        if channels != 1:
            raise DataError(f"{mask.path}: a label mask must have one channel, not {channels}")
        self._check_mask_shape(item, shape)
        return as_labels(self.read(mask, region)[0], mask.path)


READERS: dict[str, type[Reader]] = {}


def register_reader(cls: type[Reader]) -> type[Reader]:
    """Class decorator: make ``cls`` available as ``get_reader(cls.name)``; a name taken by another class is refused."""
    if not (isinstance(cls, type) and issubclass(cls, Reader)):
        raise TypeError(f"{cls!r} is not a Reader subclass")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"reader {cls.__qualname__} must set `name` (its --data.kind value)")
    suffixes = getattr(cls, "suffixes", None)
    if (
        not isinstance(suffixes, tuple)
        or not suffixes
        or not all(isinstance(s, str) and s.startswith(".") and s == s.lower() for s in suffixes)
    ):
        raise ValueError(f"reader {cls.__qualname__} must set `suffixes` to a tuple of lower-case '.ext' strings")
    old = READERS.get(name)
    same = old is not None and (old.__module__, old.__qualname__) == (cls.__module__, cls.__qualname__)
    if old is not None and old is not cls and not same:  # `same`: the module was reloaded
        raise ValueError(
            f"reader name {name!r} is already registered by {old.__module__}.{old.__qualname__}; "
            f"{cls.__module__}.{cls.__qualname__} must use another name"
        )
    READERS[name] = cls
    return cls


def get_reader(name: str) -> type[Reader]:
    """The reader class registered as ``name``; an unknown name is a DataError listing the registered ones."""
    try:
        return READERS[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(READERS)) or "(none)"
        raise DataError(f"--data.kind {name!r} is not a known reader; registered readers: {known}") from None
