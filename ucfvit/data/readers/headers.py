"""Image sizes from the first bytes of PNG, JPEG and TIFF files, without decoding the pixels.

An image file's header declares its size, and decoding allocates that size whatever the file's
own: an 850 KiB PNG can declare 30000 x 30000 pixels. :func:`declared_size` reads the declaration
so that an image larger than :data:`MAX_IMAGE_PIXELS` is refused before OpenCV decodes it.
"""

from __future__ import annotations

import re
import struct

__all__ = [
    "HEADER_PREFIX",
    "MAX_IMAGE_PIXELS",
    "PNG_SIGNATURE",
    "declared_size",
    "fast_image_header",
    "jpeg_scan",
    "png_scan",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
JPEG_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")  # in entropy-coded data: not stuffing, not a restart
HEADER_PREFIX = 256 * 1024  # bytes read for a cheap header (JPEG EXIF/ICC segments come before the frame header)
MAX_IMAGE_PIXELS = 1 << 28  # the largest image decoded: 16384 x 16384 (1 GiB as 8-bit RGBA, 1 GiB per float32 channel)
# NOTE: ucfvit/__init__.py gives OpenCV the same limit (OPENCV_IO_MAX_IMAGE_PIXELS, read when cv2 loads).
TIFF_MAGIC = {b"II*\x00": ("<", False), b"MM\x00*": (">", False), b"II+\x00": ("<", True), b"MM\x00+": (">", True)}


def png_scan(buf: bytes, to_end: bool) -> tuple[tuple[int, int, int, int] | None, bool, bool]:
    """(IHDR (width, height, bit depth, colour type) or None, tRNS seen before IDAT, IEND reached).

    Walks the chunks; with ``to_end`` False it stops at the first IDAT. Running out of bytes stops
    the walk (IEND not reached).
    """
    ihdr, trns, pos, n = None, False, len(PNG_SIGNATURE), len(buf)
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


def jpeg_scan(buf: bytes, to_end: bool) -> tuple[tuple[int, int, int, int] | None, bool]:
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
        if marker in JPEG_SOF and sof is None and pos + 8 <= n:
            sof = (buf[pos + 2], (buf[pos + 3] << 8) | buf[pos + 4], (buf[pos + 5] << 8) | buf[pos + 6], buf[pos + 7])
            if not to_end:
                return sof, False
        pos += max(length, 2)
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker
            found = JPEG_NEXT_MARKER.search(buf, pos)
            if found is None:
                return sof, False
            pos = found.start()


def fast_image_header(buf: bytes) -> tuple[int, tuple[int, int]] | None | bool:
    """(channels, (H, W)) from a PNG's IHDR or a JPEG's frame header as OpenCV will decode it.

    None: decode to know (other formats, palettes, transparency, CMYK, 12-bit). False: the header
    lies beyond ``buf``.
    """
    if buf.startswith(PNG_SIGNATURE):
        ihdr, trns, _ = png_scan(buf, to_end=False)
        if ihdr is None:
            return False
        width, height, _, colour = ihdr
        channels = {(0, False): 1, (2, False): 3, (6, False): 4, (6, True): 4}.get((colour, trns))
        return (channels, (height, width)) if channels and width and height else None
    if buf.startswith(b"\xff\xd8\xff"):
        sof, _ = jpeg_scan(buf, to_end=False)
        if sof is None:
            return False
        precision, height, width, components = sof
        ok = precision == 8 and components in (1, 3) and width and height
        return (components, (height, width)) if ok else None
    return None


def tiff_size(buf: bytes) -> tuple[int, int] | None | bool:
    """(width, height) of a TIFF's first image (the one OpenCV decodes) from its first IFD; classic
    and BigTIFF. None: not a TIFF, or no size tags. False: the IFD lies beyond ``buf``."""
    found = TIFF_MAGIC.get(buf[:4])
    if found is None:
        return None
    order, big = found
    # Classic: 4-byte IFD offset, 2-byte entry count, 12-byte entries; BigTIFF: 8, 8 and 20 bytes.
    offset_fmt, count_fmt, entry, value_at = ("Q", "Q", 20, 12) if big else ("I", "H", 12, 8)
    start = 8 if big else 4
    if len(buf) < start + struct.calcsize(offset_fmt):
        return False
    (ifd,) = struct.unpack_from(order + offset_fmt, buf, start)
    head = struct.calcsize(count_fmt)
    if ifd + head > len(buf):
        return False
    (count,) = struct.unpack_from(order + count_fmt, buf, ifd)
    if ifd + head + count * entry > len(buf):
        return False
    size: dict[int, int] = {}
    for i in range(count):
        pos = ifd + head + i * entry
        tag, kind = struct.unpack_from(order + "HH", buf, pos)
        value = {3: "H", 4: "I", 16: "Q"}.get(kind)  # SHORT, LONG, LONG8
        if tag in (256, 257) and value is not None:  # ImageWidth, ImageLength
            (size[tag],) = struct.unpack_from(order + value, buf, pos + value_at)
    return (size[256], size[257]) if len(size) == 2 else None


def declared_size(buf: bytes) -> tuple[int, int] | None | bool:
    """(width, height) that a PNG's IHDR, a JPEG's frame header or a TIFF's first IFD declares.

    None: another format (or no size in the header); OpenCV's own pixel limit then applies. False:
    the declaration lies beyond ``buf``.
    """
    if buf.startswith(PNG_SIGNATURE):
        ihdr = png_scan(buf, to_end=False)[0]
        return False if ihdr is None else ihdr[:2]
    if buf.startswith(b"\xff\xd8\xff"):
        sof = jpeg_scan(buf, to_end=False)[0]
        return False if sof is None else (sof[2], sof[1])
    return tiff_size(buf)
