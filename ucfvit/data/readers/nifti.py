"""``nifti``: NIfTI volumes (.nii, .nii.gz) read with nibabel."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from collections import OrderedDict
from typing import ClassVar

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from ucfvit.files import MIB, check_regular

from .base import DataError, Item, Reader, as_labels, float32_c, register_reader

__all__ = ["NiftiReader"]


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
    # A mismatch is a cut-off file, or a multi-member gzip (bgzip): decompress it (streaming) to know.
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while total < expected and (chunk := f.read(1 << 22)):  # what lies beyond is never read
                total += len(chunk)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: the gzip stream is truncated or corrupt ({e})") from e
    if total < expected:
        raise DataError(f"{path}: the file is truncated: it holds {total} bytes, its header needs {expected}")
    _VERIFIED[path] = (stat.st_size, stat.st_mtime_ns)


def _vox_offset(path: str) -> float | None:
    """The data offset (``vox_offset``) that a .nii.gz's NIfTI-1 or NIfTI-2 header declares; None: no such header.

    nibabel reads the header extensions up to this offset into memory, so it is checked before nibabel opens
    the file: the first 540 bytes are decompressed here, nothing more.
    """
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read(540)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: the gzip stream is truncated or corrupt ({e})") from e
    for order in "<>":
        (sizeof_hdr,) = struct.unpack_from(order + "i", raw) if len(raw) >= 4 else (0,)
        if sizeof_hdr == 348 and len(raw) >= 112:
            return struct.unpack_from(order + "f", raw, 108)[0]
        if sizeof_hdr == 540 and len(raw) >= 176:
            return struct.unpack_from(order + "q", raw, 168)[0]
    return None


@register_reader
class NiftiReader(Reader):
    """NIfTI volumes (.nii, .nii.gz) read with nibabel: (X, Y, Z) is one channel, (X, Y, Z, C) is C channels."""

    name = "nifti"
    suffixes = (".nii", ".nii.gz")
    spatial_ndim = 3
    cache_files: ClassVar[int] = 8  # memory maps (and decompressed volumes) kept for the next tiles
    cache_bytes: ClassVar[int] = 1 << 30  # the largest decompressed .nii.gz volume kept
    max_gz_bytes: ClassVar[int] = 1 << 30  # the largest .nii.gz read (decompressed whole): header and data

    @classmethod
    def _load(cls, path: str):
        """The nibabel image, its data checked to be all in the file (cheap: file size or gzip trailer), and a
        .nii.gz checked to hold at most ``max_gz_bytes`` once decompressed (from the header's shape and dtype)."""
        path = os.fspath(path)
        check_regular(path, "a NIfTI file", DataError)  # a FIFO would block the reader
        compressed = path.lower().endswith(".gz")
        if compressed:
            declared = _vox_offset(path)
            if declared is not None and not 0 <= declared <= cls.max_gz_bytes:  # NaN fails too
                raise cls._too_large(path, f"its header puts the data at byte {declared:.0f} (vox_offset)")
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
        if compressed and expected > cls.max_gz_bytes:
            raise cls._too_large(path, f"it holds {expected / MIB:,.0f} MiB decompressed (shape {shape}, {dtype})")
        if compressed:
            _gzip_size_ok(path, expected)
        elif os.path.getsize(path) < expected:
            raise DataError(
                f"{path}: the file is truncated: it has {os.path.getsize(path)} bytes, its header needs {expected}"
            )
        return img, shape

    @classmethod
    def _too_large(cls, path: str, why: str) -> DataError:
        return DataError(
            f"{path}: {why}, more than the {cls.max_gz_bytes / MIB:,.0f} MiB of a .nii.gz that ucfvit decompresses "
            "(whole, NiftiReader.max_gz_bytes); gunzip it: a .nii is memory-mapped and only each tile is read"
        )

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
        out = float32_c(data)
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
        return as_labels(self._slice(img, path, index), path)
