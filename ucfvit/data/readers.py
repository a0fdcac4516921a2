"""File readers: one class per file format, chosen by its name (``--data.kind``) from a registry.

A reader finds the files of a dataset (:meth:`Reader.items`), tells their channel count and spatial
shape cheaply (:meth:`Reader.header`), and reads an image or a region of it as float32 ``(C, *S)``
with raw values (:meth:`Reader.read`) or a label mask as int64 ``(*S)`` (:meth:`Reader.read_mask`).
Bad input is a :class:`DataError` whose message starts with the file it is about and names the
option to fix where one applies. Built in: ``imagefolder`` (JPEG/PNG/TIFF via OpenCV), ``nifti``
(nibabel) and ``npy`` (memory-mapped NumPy arrays).

A new format is one reader class plus one registry line (the decorator); :meth:`Reader.items` and
:meth:`Reader.read_mask` come from the base class. For example, headerless float32 volumes::

    @register_reader
    class RawReader(Reader):
        \"\"\"Little-endian float32 volumes of one fixed shape, e.g. ``scan.raw``.\"\"\"

        name, suffixes, spatial_ndim = "raw", (".raw",), 3
        shape = (128, 128, 128)

        def header(self, item):
            return 1, self.shape

        def read(self, item, region=None):
            vol = np.memmap(item.path, dtype="<f4", mode="r", shape=self.shape)
            return np.array(vol[self.slices(region)], dtype=np.float32)[None]
"""

from __future__ import annotations

import gzip
import math
import os
import re
import struct
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import cv2
import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

__all__ = [
    "READERS",
    "DataError",
    "ImageFolderReader",
    "Item",
    "NiftiReader",
    "NpyReader",
    "Reader",
    "get_reader",
    "register_reader",
]


class DataError(ValueError):
    """Bad input data; the message names the file (and the option to fix, where one applies)."""


@dataclass(frozen=True)
class Item:
    """One image or volume file of a dataset, with its class index and label-mask file if it has them."""

    path: str  # absolute path of the image/volume file
    label: int | None = None  # class index (imagefolder: index of its class sub-folder in sorted order), else None
    mask: str | None = None  # absolute path of its label mask/volume (matched by name in the labels dir), else None


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _check_dir(path: Path | str, option: str, what: str) -> Path:
    """``path`` made absolute, or a DataError if it is not an existing directory."""
    path = Path(os.path.abspath(os.fspath(path)))
    if not path.exists():
        raise DataError(f"{path}: the {what} does not exist; check {option}")
    if not path.is_dir():
        raise DataError(f"{path}: the {what} is not a directory; {option} must name a folder")
    return path


def _as_labels(arr: np.ndarray, path: str) -> np.ndarray:
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


def _float32_c(data: np.ndarray) -> np.ndarray:
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
                entries = sorted((e for e in it if not _is_hidden(e.name)), key=lambda e: e.name)
            for entry in entries:
                if entry.is_dir():
                    yield from visit(Path(entry.path), (*parts, entry.name))
                elif entry.is_file() and self.stem(entry.name) is not None:
                    yield (*parts, entry.name)

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
        labels = _check_dir(labels, "--data.labels", "labels folder")
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
        root = _check_dir(root, "--data.root", "data root")
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
        return _as_labels(self.read(mask, region)[0], mask.path)


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


# =========================================================================================== images
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")  # in entropy-coded data: not stuffing, not a restart
_HEADER_PREFIX = 256 * 1024  # bytes read for a cheap header (JPEG EXIF/ICC segments come before the frame header)


def _png_scan(buf: bytes, to_end: bool) -> tuple[tuple[int, int, int, int] | None, bool, bool]:
    """(IHDR (width, height, bit depth, colour type) or None, tRNS seen before IDAT, IEND reached).

    Walks the chunks; with ``to_end`` False it stops at the first IDAT. Running out of bytes stops
    the walk (IEND not reached).
    """
    ihdr, trns, pos, n = None, False, len(_PNG_SIGNATURE), len(buf)
    while pos + 8 <= n:
        length, kind = struct.unpack(">I4s", buf[pos : pos + 8])
        if kind == b"IHDR" and ihdr is None and length >= 13 and pos + 8 + 13 <= n:
            ihdr = struct.unpack(">IIBB", buf[pos + 8 : pos + 18])
        elif kind == b"tRNS":
            trns = True
        elif kind == b"IDAT" and not to_end:
            return ihdr, trns, False
        end = pos + 12 + length
        if kind == b"IEND":
            return ihdr, trns, end <= n
        pos = end
    return ihdr, trns, False


def _jpeg_scan(buf: bytes, to_end: bool) -> tuple[tuple[int, int, int, int] | None, bool]:
    """(frame header (precision, height, width, components) or None, EOI reached).

    Walks the marker segments by their lengths (so an EXIF thumbnail's own end marker inside APP1 is
    skipped) and the entropy-coded data after each SOS up to its next marker; with ``to_end`` False it
    stops at the frame header. Bytes between segments that are not a marker are skipped, as libjpeg does.
    """
    sof, pos, n = None, 2, len(buf)
    while True:
        pos = buf.find(b"\xff", pos)
        if pos < 0:
            return sof, False
        while pos < n and buf[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            return sof, False
        marker = buf[pos]
        pos += 1
        if marker == 0xD9:
            return sof, True
        if marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            continue
        if pos + 2 > n:
            return sof, False
        length = (buf[pos] << 8) | buf[pos + 1]
        if marker in _JPEG_SOF and sof is None and pos + 8 <= n:
            sof = (buf[pos + 2], (buf[pos + 3] << 8) | buf[pos + 4], (buf[pos + 5] << 8) | buf[pos + 6], buf[pos + 7])
            if not to_end:
                return sof, False
        pos += max(length, 2)
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker
            found = _JPEG_NEXT_MARKER.search(buf, pos)
            if found is None:
                return sof, False
            pos = found.start()


def _fast_image_header(buf: bytes) -> tuple[int, tuple[int, int]] | None | bool:
    """(channels, (H, W)) from a PNG's IHDR or a JPEG's frame header as OpenCV will decode it.

    None: decode to know (other formats, palettes, transparency, CMYK, 12-bit). False: the header
    lies beyond ``buf``.
    """
    if buf.startswith(_PNG_SIGNATURE):
        ihdr, trns, _ = _png_scan(buf, to_end=False)
        if ihdr is None:
            return False
        width, height, _, colour = ihdr
        channels = {(0, False): 1, (2, False): 3, (6, False): 4, (6, True): 4}.get((colour, trns))
        return (channels, (height, width)) if channels and width and height else None
    if buf.startswith(b"\xff\xd8\xff"):
        sof, _ = _jpeg_scan(buf, to_end=False)
        if sof is None:
            return False
        precision, height, width, components = sof
        ok = precision == 8 and components in (1, 3) and width and height
        return (components, (height, width)) if ok else None
    return None


@register_reader
class ImageFolderReader(Reader):
    """2D images (JPEG, PNG, TIFF) read with OpenCV; class sub-folders of the root give the labels (ImageNet style).

    Grayscale is one channel, colour is RGB, colour with alpha is RGBA; 8- and 16-bit values stay raw
    (0..255 / 0..65535). Masks are single-channel integer images of class indices.
    """

    name = "imagefolder"
    suffixes = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
    spatial_ndim = 2

    def classes(self, root: Path) -> list[str]:
        """The class names: ``root``'s non-hidden sub-folders, sorted (label k is the k-th).

        [] when ``root`` is no class tree: it has no sub-folders, or images lie directly in it.
        """
        root = _check_dir(root, "--data.root", "data root")
        with os.scandir(root) as it:
            entries = [e for e in it if not _is_hidden(e.name)]
        if any(e.is_file() and self.stem(e.name) is not None for e in entries):
            return []
        return sorted(e.name for e in entries if e.is_dir())

    def items(self, root: Path, labels: Path | None = None) -> list[Item]:
        """Images under ``root``, labelled by their class sub-folder (see :meth:`classes`; no class tree: None)."""
        root = _check_dir(root, "--data.root", "data root")
        classes = self.classes(root)
        found = [(parts, classes.index(parts[0]) if classes else None) for parts in self._walk(root)]
        if not found:
            raise self._no_files(root)
        return self._match_masks(root, labels, found)

    @staticmethod
    def _bytes(path: str, limit: int = -1) -> bytes:
        try:
            with open(path, "rb") as f:
                buf = f.read(limit)
        except OSError as e:
            raise DataError(f"{path}: cannot read the file ({e.strerror or e})") from e
        if not buf:
            raise DataError(f"{path}: the file is empty")
        return buf

    def _decode(self, path: str) -> np.ndarray:
        """The decoded image, (H, W) or (H, W, C) in OpenCV's channel order, after checking the file is whole."""
        buf = self._bytes(path)
        if buf.startswith(_PNG_SIGNATURE) and not _png_scan(buf, to_end=True)[2]:
            raise DataError(f"{path}: the PNG file is truncated or corrupt (its chunks end before IEND)")
        if buf.startswith(b"\xff\xd8\xff") and not _jpeg_scan(buf, to_end=True)[1]:
            raise DataError(f"{path}: the JPEG file is truncated or corrupt (no end-of-image marker after its data)")
        try:
            img = cv2.imdecode(np.frombuffer(buf, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        except cv2.error as e:
            raise DataError(f"{path}: OpenCV cannot decode this image ({str(e).strip()})") from e
        if img is None or img.size == 0:
            raise DataError(f"{path}: OpenCV cannot decode this image; the file is corrupt or not a JPEG/PNG/TIFF")
        expected = _fast_image_header(buf)
        if expected and (img.shape[2] if img.ndim == 3 else 1, img.shape[:2]) != expected:
            raise DataError(f"{path}: the header says (channels, size) {expected}, but it decodes to {img.shape}")
        return img

    def header(self, item: Item) -> tuple[int, tuple[int, int]]:
        """(channels, (H, W)): from the PNG IHDR or JPEG frame header when they settle it, else by decoding."""
        buf = self._bytes(item.path, _HEADER_PREFIX)
        found = _fast_image_header(buf)
        if found is False and len(buf) == _HEADER_PREFIX:
            found = _fast_image_header(self._bytes(item.path))
        if found:
            return found
        img = self._decode(item.path)
        return (img.shape[2] if img.ndim == 3 else 1), tuple(img.shape[:2])

    def read(self, item: Item, region: tuple[slice, ...] | None = None) -> np.ndarray:
        """(C, H, W) float32 with raw values: grayscale 1 channel, RGB 3, RGBA 4 (OpenCV's BGR(A) reordered)."""
        img = self._decode(item.path)[self.slices(region)]
        if img.ndim == 2:
            return img[None].astype(np.float32)
        channels = img.shape[2]
        order = [2, 1, 0, 3][:channels] if channels in (3, 4) else range(channels)
        out = np.empty((channels, *img.shape[:2]), dtype=np.float32)
        for i, j in enumerate(order):  # one plane at a time: far faster than a strided transpose-and-cast
            out[i] = img[:, :, j]
        return out

    def read_mask(self, item: Item, region: tuple[slice, ...] | None = None) -> np.ndarray:
        """(H, W) int64 class per pixel from the single-channel integer mask image."""
        region = self.slices(region)
        path = self._mask_of(item)
        buf = self._bytes(path, _HEADER_PREFIX)
        if buf.startswith(_PNG_SIGNATURE) and (_png_scan(buf, to_end=False)[0] or (0, 0, 0, 0))[3] == 3:
            raise DataError(
                f"{path}: the label mask is a palette (indexed-colour) PNG, which OpenCV expands to colours; "
                "save it as a grayscale PNG whose values are the class indices"
            )
        mask = self._decode(path)
        if mask.ndim != 2:
            raise DataError(
                f"{path}: a label mask must be a single-channel image of class indices, but it has {mask.shape[2]} "
                "channels; save it as grayscale"
            )
        self._check_mask_shape(item, mask.shape)
        return _as_labels(mask[region], path)


# =========================================================================================== NIfTI
_NIFTI_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error)
_VERIFIED: dict[str, tuple[int, int]] = {}  # .nii.gz files read to the end once: path -> (size, mtime_ns)


def _gzip_size_ok(path: str, expected: int) -> None:
    """Check a .nii.gz holds ``expected`` bytes once decompressed: from the gzip trailer, else by decompressing."""
    stat = os.stat(path)
    if _VERIFIED.get(path) == (stat.st_size, stat.st_mtime_ns):
        return
    with open(path, "rb") as f:
        f.seek(max(stat.st_size - 4, 0))
        trailer = f.read(4)
    if len(trailer) == 4 and struct.unpack("<I", trailer)[0] == expected & 0xFFFFFFFF:
        return  # the usual single-member gzip: its trailer gives the size
    # A mismatch is a cut-off file, or a multi-member gzip (bgzip): decompress it all to know.
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                total += len(chunk)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: the gzip stream is truncated or corrupt ({e})") from e
    if total < expected:
        raise DataError(f"{path}: the file is truncated: it holds {total} bytes, its header needs {expected}")
    _VERIFIED[path] = (stat.st_size, stat.st_mtime_ns)


@register_reader
class NiftiReader(Reader):
    """NIfTI volumes (.nii, .nii.gz) read with nibabel: (X, Y, Z) is one channel, (X, Y, Z, C) is C channels."""

    name = "nifti"
    suffixes = (".nii", ".nii.gz")
    spatial_ndim = 3
    cache_files: ClassVar[int] = 8  # memory maps (and decompressed volumes) kept for the next tiles
    cache_bytes: ClassVar[int] = 1 << 30  # the largest decompressed .nii.gz volume kept

    @staticmethod
    def _load(path: str):
        """The nibabel image, its data checked to be all in the file (cheap: file size or gzip trailer)."""
        path = os.fspath(path)
        try:
            img = nib.load(path)
            shape = tuple(int(s) for s in img.shape)
            dtype = img.get_data_dtype()
            offset = int(getattr(img.dataobj, "offset", img.header.get_data_offset()))
        except _NIFTI_ERRORS + (ValueError,) as e:
            raise DataError(f"{path}: nibabel cannot read this NIfTI file; it is corrupt or truncated ({e})") from e
        if len(shape) not in (3, 4) or 0 in shape:
            raise DataError(f"{path}: a NIfTI image must be 3D (X, Y, Z) or 4D (X, Y, Z, C), not shape {shape}")
        if dtype.kind not in "biuf" or dtype.fields is not None:
            raise DataError(f"{path}: NIfTI data type {dtype} is not a numeric image type (integer or float)")
        expected = offset + math.prod(shape) * dtype.itemsize
        if path.lower().endswith(".gz"):
            _gzip_size_ok(path, expected)
        elif os.path.getsize(path) < expected:
            raise DataError(
                f"{path}: the file is truncated: it has {os.path.getsize(path)} bytes, its header needs {expected}"
            )
        return img, shape

    def header(self, item: Item) -> tuple[int, tuple[int, int, int]]:
        """(channels, (X, Y, Z)) from the NIfTI header alone."""
        _, shape = self._load(item.path)
        return (shape[3] if len(shape) == 4 else 1), shape[:3]

    @staticmethod
    def _slice(img, path: str, index: tuple[slice, ...]) -> np.ndarray:
        try:
            return np.asarray(img.dataobj[index])
        except _NIFTI_ERRORS + (ValueError,) as e:
            raise DataError(f"{path}: nibabel cannot read the data; the file is corrupt or truncated ({e})") from e

    def _stored(self, img, path: str) -> np.ndarray:
        """The image's stored (unscaled) values: a memory map of a .nii, or the decompressed array of a .nii.gz.

        The last ``cache_files`` memory maps are kept (a page of a file is then mapped once per
        process, not once per tile), and with them the last decompressed volume of up to
        ``cache_bytes``, so the tiles of one .nii.gz cost one decompression while read in a row.
        """
        stat = os.stat(path)
        key = (path, stat.st_size, stat.st_mtime_ns)
        kept = self.__dict__.setdefault("_kept", OrderedDict())
        if key in kept:
            kept.move_to_end(key)
            return kept[key][0]
        try:
            stored = np.asanyarray(img.dataobj.get_unscaled())
        except _NIFTI_ERRORS + (ValueError,) as e:
            raise DataError(f"{path}: nibabel cannot read the data; the file is corrupt or truncated ({e})") from e
        mapped = isinstance(stored, np.memmap)
        stored = np.asarray(stored)  # a plain view: slicing a np.memmap costs a Python call per slice
        if mapped or stored.nbytes <= self.cache_bytes:
            if not mapped:  # one decompressed volume at most
                for old in [k for k, (_, was_mapped) in kept.items() if not was_mapped]:
                    del kept[old]
            kept[key] = stored, mapped
            while len(kept) > self.cache_files:
                kept.popitem(last=False)
        return stored

    def __getstate__(self) -> dict:
        """Pickled (to spawned loader workers) without the kept arrays."""
        return {k: v for k, v in self.__dict__.items() if k != "_kept"}

    def read(self, item: Item, region: tuple[slice, ...] | None = None) -> np.ndarray:
        """(C, *region shape) float32 (native-endian, scl_slope/inter applied); a .nii is memory-mapped, so only
        the region is read."""
        region = self.slices(region)
        img, shape = self._load(item.path)
        stored = self._stored(img, item.path)
        data = stored[region][None] if len(shape) == 3 else np.moveaxis(stored[(*region, slice(None))], -1, 0)
        out = _float32_c(data)
        slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
        if (slope, inter) != (1.0, 0.0):
            out *= np.float32(slope)
            out += np.float32(inter)
        return out

    def read_mask(self, item: Item, region: tuple[slice, ...] | None = None) -> np.ndarray:
        """(*region shape) int64 from the label volume: whole numbers, same spatial shape as the image."""
        region = self.slices(region)
        path = self._mask_of(item)
        img, shape = self._load(path)
        if len(shape) == 4 and shape[3] != 1:
            raise DataError(f"{path}: a label volume must have one channel, but its shape is {shape}")
        self._check_mask_shape(item, shape[:3])
        index = region if len(shape) == 3 else (*region, 0)
        return _as_labels(self._slice(img, path, index), path)


# =========================================================================================== npy
@register_reader
class NpyReader(Reader):
    """NumPy ``.npy`` arrays, memory-mapped: ``spatial_ndim`` dims is one channel, one more is (C, *S) channels-first.

    Arrays of Python objects are refused without being loaded (unpickling can run code).
    """

    name = "npy"
    suffixes = (".npy",)
    spatial_ndim = None

    def __init__(self, spatial_ndim: int | None = None):
        """``spatial_ndim``: the number of spatial axes of every array, 2 or 3 (required)."""
        if spatial_ndim not in (2, 3):
            raise ValueError(
                f"the 'npy' reader needs spatial_ndim = 2 or 3 (how many axes of each array are spatial), "
                f"not {spatial_ndim!r}"
            )
        self.spatial_ndim = spatial_ndim

    @staticmethod
    def _array_header(path: str) -> tuple[tuple[int, ...], np.dtype]:
        """(shape, dtype) from the .npy header, checked: numeric dtype and all data present in the file."""
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f".npy format version {version} holds no plain numeric array")
                offset = f.tell()
        except (OSError, EOFError, ValueError, SyntaxError) as e:
            raise DataError(f"{path}: not a readable .npy file; it is corrupt or truncated ({e})") from e
        if dtype.hasobject:
            raise DataError(
                f"{path}: the array holds Python objects (dtype {dtype}), which are never loaded because unpickling "
                "can run code; save a numeric array"
            )
        if dtype.kind not in "biuf" or dtype.fields is not None:
            raise DataError(f"{path}: dtype {dtype} is not a numeric image type (bool, integer or float)")
        expected = offset + math.prod(shape) * dtype.itemsize
        size = os.path.getsize(path)
        if size < expected:
            raise DataError(f"{path}: the file is truncated: it has {size} bytes, its header needs {expected}")
        return tuple(int(s) for s in shape), dtype

    def _layout(self, path: str, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        nd = self.spatial_ndim
        if len(shape) == nd:
            channels, spatial = 1, shape
        elif len(shape) == nd + 1:
            channels, spatial = shape[0], shape[1:]
        else:
            raise DataError(
                f"{path}: array shape {shape} does not fit spatial_ndim={nd}: expected {nd} dims (one channel) or "
                f"{nd + 1} dims (C, *spatial), channels first"
            )
        if channels == 0 or 0 in spatial:
            raise DataError(f"{path}: the array is empty (shape {shape})")
        return channels, spatial

    def _mmap(self, path: str) -> np.ndarray:
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, EOFError, ValueError) as e:
            raise DataError(f"{path}: cannot memory-map this .npy file ({e})") from e

    def header(self, item: Item) -> tuple[int, tuple[int, ...]]:
        """(channels, spatial shape) from the .npy header alone."""
        return self._layout(item.path, self._array_header(item.path)[0])

    def read(self, item: Item, region: tuple[slice, ...] | None = None) -> np.ndarray:
        """(C, *region shape) float32; only the region is read from the memory-mapped file."""
        region = self.slices(region)
        shape, _ = self._array_header(item.path)
        self._layout(item.path, shape)
        channels_first = len(shape) == self.spatial_ndim + 1
        arr = self._mmap(item.path)
        data = arr[(slice(None), *region)] if channels_first else arr[region][None]
        return _float32_c(data)

    def read_mask(self, item: Item, region: tuple[slice, ...] | None = None) -> np.ndarray:
        """(*region shape) int64 from an integer (or whole-number float) array of the image's spatial shape."""
        region = self.slices(region)
        path = self._mask_of(item)
        shape, _ = self._array_header(path)
        spatial = shape[1:] if len(shape) == self.spatial_ndim + 1 and shape[0] == 1 else shape
        self._check_mask_shape(item, spatial)
        arr = self._mmap(path)
        data = arr[(0, *region)] if len(shape) != len(spatial) else arr[region]
        return _as_labels(np.asarray(data), path)
