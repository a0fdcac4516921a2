"""Small files that expand without bound when read naively, for the tests of the bounded readers.

Each is built from one compressed block repeated (a deflate stream of zeros), never by compressing
the expanded bytes, so a file that declares gigabytes takes a fraction of a second to make.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

MIB = 1 << 20


def deflated_zeros(n: int) -> bytes:
    """A raw deflate stream of ``n`` zero bytes: one compressed MiB repeated (each ends in a full flush,
    which leaves no history behind, so the next MiB compresses to the same bytes)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = comp.compress(bytes(MIB)) + comp.flush(zlib.Z_FULL_FLUSH)
    full, rest = divmod(n, MIB)
    return block * full + comp.compress(bytes(rest)) + comp.flush()


def zeros_crc32(n: int, crc: int = 0) -> int:
    """The CRC-32 of ``n`` zero bytes (following bytes whose CRC-32 is ``crc``)."""
    chunk = memoryview(bytes(64 * MIB))
    for start in range(0, n, len(chunk)):
        crc = zlib.crc32(chunk[: min(len(chunk), n - start)], crc)
    return crc


def gzip_zeros(n: int, prefix: bytes = b"") -> bytes:
    """One gzip member holding ``prefix`` and then ``n`` zero bytes."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = comp.compress(prefix) + comp.flush(zlib.Z_FULL_FLUSH) + deflated_zeros(n)
    trailer = struct.pack("<II", zeros_crc32(n, zlib.crc32(prefix)), (len(prefix) + n) & 0xFFFFFFFF)
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + body + trailer


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A valid 8-bit grayscale PNG of ``width`` x ``height`` black pixels: 30000 x 30000 takes 874 KiB
    and decodes to 900 MB."""
    raw = height * (width + 1)  # a filter byte before each row
    adler = ((raw % 65521) << 16) | 1  # Adler-32 of zeros: a = 1, b = n
    stream = b"\x78\xda" + deflated_zeros(raw) + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", stream) + png_chunk(b"IEND", b"")
    )
    return path


def nifti_gz_declaring(path: Path, shape: tuple[int, ...], dtype=np.uint8) -> Path:
    """A valid .nii.gz of zeros of ``shape``: a multi-member gzip of one repeated 64 MiB member (2.7 GB
    of data in 2.7 MB)."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    head = header.binaryblock + b"\x00" * 4  # no extensions
    total = int(np.prod(shape)) * np.dtype(dtype).itemsize
    full, rest = divmod(total, 64 * MIB)
    path.write_bytes(gzip_zeros(rest, head) + gzip_zeros(64 * MIB) * full)
    return path


def pth_declaring(path: Path, numel: int) -> Path:
    """A ``torch.save`` zip of ``{"w": float32 zeros(numel)}`` whose storage is deflated: 1 GiB in 1 MiB.
    ``torch.load`` inflates it whole."""
    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.empty(12345)}, buf)  # 12345: a number found only where the size is
    source = zipfile.ZipFile(buf)
    members = []
    for info in source.infolist():
        data = source.read(info)
        if info.filename.endswith("/data.pkl"):
            data = data.replace(b"M" + struct.pack("<H", 12345), b"J" + struct.pack("<i", numel))  # BININT2 -> BININT
            members.append((info.filename, data, len(data), zlib.crc32(data), zipfile.ZIP_STORED))
        elif info.filename.endswith("/data/0"):
            size = numel * 4
            members.append((info.filename, deflated_zeros(size), size, zeros_crc32(size), zipfile.ZIP_DEFLATED))
        else:
            members.append((info.filename, data, len(data), zlib.crc32(data), zipfile.ZIP_STORED))
    path.write_bytes(zip_bytes(members))
    return path


def zip_bytes(members: list[tuple[str, bytes, int, int, int]]) -> bytes:
    """A zip of ``(name, stored bytes, size, crc, method)`` members whose data is already compressed
    (Python's zipfile compresses what it writes); sizes below 4 GiB (no zip64)."""
    out, central = bytearray(), bytearray()
    for name, data, size, crc, method in members:
        encoded = name.encode()
        fields = struct.pack("<HHHHHIIIHH", 20, 0, method, 0, 0x21, crc, len(data), size, len(encoded), 0)
        central += struct.pack("<IH", 0x02014B50, 20) + fields + struct.pack("<HHHII", 0, 0, 0, 0, len(out)) + encoded
        out += struct.pack("<I", 0x04034B50) + fields + encoded + data
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(out), 0)
    return bytes(out + central + end)


def yaml_aliases(path: Path, levels: int = 9) -> Path:
    """A YAML config of nested aliases (under 1 KiB): ``arch.variables`` expands to 10**levels strings."""
    lines = ["model: vit", "arch:", "  variables:", "    - &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"    - &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    path.write_text("\n".join(lines) + "\n")
    return path


def deep_json(path: Path, depth: int = 100_000) -> Path:
    """A JSON config whose ``arch`` option is nested ``depth`` lists deep."""
    path.write_text(json.dumps({"model": "vit"})[:-1] + ', "arch": ' + "[" * depth + "]" * depth + "}")
    return path
