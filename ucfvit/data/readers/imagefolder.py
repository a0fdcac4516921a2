"""``imagefolder``: 2D images (JPEG, PNG, TIFF) read with OpenCV, class sub-folders as labels."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np

from ucfvit.files import check_regular

from .base import DataError, Item, Reader, as_labels, check_dir, is_hidden, register_reader
from .headers import (
    HEADER_PREFIX,
    MAX_IMAGE_PIXELS,
    PNG_SIGNATURE,
    declared_size,
    fast_image_header,
    jpeg_scan,
    png_scan,
)

__all__ = ["ImageFolderReader"]


@register_reader
class ImageFolderReader(Reader):
    """2D images (JPEG, PNG, TIFF) read with OpenCV; class sub-folders of the root give the labels (ImageNet style).

    Grayscale is one channel, colour is RGB, colour with alpha is RGBA; 8- and 16-bit values stay raw
    (0..255 / 0..65535). Masks are single-channel integer images of class indices. An image whose
    header declares more than ``max_pixels`` pixels is refused before it is decoded.
    """

    name = "imagefolder"
    suffixes = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
    spatial_ndim = 2
    max_pixels: ClassVar[int] = MAX_IMAGE_PIXELS

    def classes(self, root: Path) -> list[str]:
        """The class names: ``root``'s non-hidden sub-folders, sorted (label k is the k-th).

        [] when ``root`` is no class tree: it has no sub-folders, or images lie directly in it.
        """
        root = check_dir(root, "--data.root", "data root")
        with os.scandir(root) as it:
            entries = [e for e in it if not is_hidden(e.name)]
        if any(e.is_file() and self.stem(e.name) is not None for e in entries):
            return []
        return sorted(e.name for e in entries if e.is_dir())

    def items(self, root: Path, labels: Path | None = None) -> list[Item]:
        """Images under ``root``, labelled by their class sub-folder (see :meth:`classes`; no class tree: None)."""
        root = check_dir(root, "--data.root", "data root")
        classes = self.classes(root)
        found = [(parts, classes.index(parts[0]) if classes else None) for parts in self._walk(root)]
        if not found:
            raise self._no_files(root)
        return self._match_masks(root, labels, found)

    @staticmethod
    def _bytes(path: str, limit: int = -1) -> bytes:
        check_regular(path, "an image file", DataError)  # a FIFO would block the reader
        try:
            with open(path, "rb") as f:
                buf = f.read(limit)
        except OSError as e:
            raise DataError(f"{path}: cannot read the file ({e.strerror or e})") from e
        if not buf:
            raise DataError(f"{path}: the file is empty")
        return buf

    def _check_size(self, path: str, buf: bytes) -> bool:
        """Refuse an image whose header declares more than ``max_pixels``; False: the header lies beyond ``buf``."""
        size = declared_size(buf)
        if size and size[0] * size[1] > self.max_pixels:
            width, height = size
            raise DataError(
                f"{path}: the image declares {width} x {height} pixels, more than the {self.max_pixels:,} that "
                "ucfvit decodes (ImageFolderReader.max_pixels); cut it into smaller images or scale it down"
            )
        return size is not False

    def _decode(self, path: str) -> np.ndarray:
        """The decoded image, (H, W) or (H, W, C) in OpenCV's channel order, after checking the file is whole
        and that its declared size is within ``max_pixels``."""
        buf = self._bytes(path)
        self._check_size(path, buf)
        if buf.startswith(PNG_SIGNATURE) and not png_scan(buf, to_end=True)[2]:
            raise DataError(f"{path}: the PNG file is truncated or corrupt (its chunks end before IEND)")
        if buf.startswith(b"\xff\xd8\xff") and not jpeg_scan(buf, to_end=True)[1]:
            raise DataError(f"{path}: the JPEG file is truncated or corrupt (no end-of-image marker after its data)")
        try:
            img = cv2.imdecode(np.frombuffer(buf, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        except cv2.error as e:
            raise DataError(f"{path}: OpenCV cannot decode this image ({str(e).strip()})") from e
        if img is None or img.size == 0:
            raise DataError(f"{path}: OpenCV cannot decode this image; the file is corrupt or not a JPEG/PNG/TIFF")
        expected = fast_image_header(buf)
        if expected and (img.shape[2] if img.ndim == 3 else 1, img.shape[:2]) != expected:
            raise DataError(f"{path}: the header says (channels, size) {expected}, but it decodes to {img.shape}")
        return img

    def header(self, item: Item) -> tuple[int, tuple[int, int]]:
        """(channels, (H, W)): from the PNG IHDR or JPEG frame header when they settle it, else by decoding."""
        buf = self._bytes(item.path, HEADER_PREFIX)
        if not self._check_size(item.path, buf) and len(buf) == HEADER_PREFIX:
            buf = self._bytes(item.path)
            self._check_size(item.path, buf)
        found = fast_image_header(buf)
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
        buf = self._bytes(path, HEADER_PREFIX)
        if buf.startswith(PNG_SIGNATURE) and (png_scan(buf, to_end=False)[0] or (0, 0, 0, 0))[3] == 3:
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
        return as_labels(mask[region], path)
