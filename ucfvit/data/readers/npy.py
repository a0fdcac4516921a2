"""``npy``: NumPy arrays, memory-mapped."""

from __future__ import annotations

import math
import os

import numpy as np

from ucfvit.files import check_regular

from .base import DataError, Item, Reader, as_labels, float32_c, register_reader

__all__ = ["NpyReader"]


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
        check_regular(path, "a .npy file", DataError)  # a FIFO would block the reader
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
        return float32_c(data)

    def read_mask(self, item: Item, region: tuple[slice, ...] | None = None) -> np.ndarray:
        """(*region shape) int64 from an integer (or whole-number float) array of the image's spatial shape."""
        region = self.slices(region)
        path = self._mask_of(item)
        shape, _ = self._array_header(path)
        spatial = shape[1:] if len(shape) == self.spatial_ndim + 1 and shape[0] == 1 else shape
        self._check_mask_shape(item, spatial)
        arr = self._mmap(path)
        data = arr[(0, *region)] if len(shape) != len(spatial) else arr[region]
        return as_labels(np.asarray(data), path)
