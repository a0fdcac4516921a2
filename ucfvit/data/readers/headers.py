"""Image sizes from the first bytes of PNG and JPEG files, without decoding the pixels."""

from __future__ import annotations

import re
import struct

__all__ = ["HEADER_PREFIX", "PNG_SIGNATURE", "fast_image_header", "jpeg_scan", "png_scan"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
JPEG_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")  # in entropy-coded data: not stuffing, not a restart
HEADER_PREFIX = 256 * 1024  # bytes read for a cheap header (JPEG EXIF/ICC segments come before the frame header)


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
