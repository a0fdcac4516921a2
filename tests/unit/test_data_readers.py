"""The file readers of ucfvit.data.readers on files generated in tmp_path: listing, headers, reads, masks, bad input."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import ClassVar

import cv2
import nibabel as nib
import numpy as np
import pytest

from ucfvit.data import readers
from ucfvit.data.readers import (
    READERS,
    DataError,
    ImageFolderReader,
    Item,
    NiftiReader,
    NpyReader,
    Reader,
    get_reader,
    register_reader,
)

RNG = np.random.default_rng(0)


def imwrite(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr), path
    return path


def smooth(shape, dtype=np.uint8) -> np.ndarray:
    """A smooth image (JPEG keeps it close), full range of ``dtype``."""
    h, w = shape[:2]
    base = np.add.outer(np.linspace(0, 0.3, h), np.linspace(0, 0.3, w))
    if len(shape) == 3:  # channels far apart, so a wrong channel order shows
        base = np.stack([base + 0.3 * c for c in range(shape[2])], axis=-1)
    return (base * np.iinfo(dtype).max).astype(dtype)


def png_bytes(width, height, colour, depth, rows, extra=b"") -> bytes:
    """A hand-made PNG (for colour types OpenCV cannot write): rows are unfiltered scanline bytes."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
    idat = chunk(b"IDAT", zlib.compress(b"".join(b"\x00" + r for r in rows)))
    return b"\x89PNG\r\n\x1a\n" + ihdr + extra + idat + chunk(b"IEND", b"")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def check_read(reader: Reader, item: Item, region: tuple[slice, ...]) -> np.ndarray:
    """Read ``item`` whole and by ``region``; check header, dtype and that the region is a slice of the whole."""
    full = reader.read(item)
    assert full.dtype == np.float32 and full.flags.c_contiguous
    channels, shape = reader.header(item)
    assert (channels, tuple(shape)) == (full.shape[0], full.shape[1:])
    part = reader.read(item, region)
    np.testing.assert_array_equal(part, full[(slice(None), *region)])
    return full


def raises(match_parts, fn, *args, **kwargs) -> str:
    """Call ``fn``; it must raise DataError whose message holds every string of ``match_parts``."""
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    for part in match_parts:
        assert str(part) in message, (part, message)
    return message


# =========================================================================================== registry
@pytest.fixture
def registry():
    saved = dict(READERS)
    yield READERS
    READERS.clear()
    READERS.update(saved)


def test_builtin_readers_are_registered():
    assert get_reader("imagefolder") is ImageFolderReader
    assert get_reader("nifti") is NiftiReader
    assert get_reader("npy") is NpyReader
    message = raises(["--data.kind", "'tiff-stack'", "imagefolder", "nifti", "npy"], get_reader, "tiff-stack")
    assert "registered" in message


def test_new_reader_is_one_class_and_one_registry_line(tmp_path, registry):
    """The module docstring's example: only header and read; items and read_mask come from the base class."""

    @register_reader
    class RawReader(Reader):
        name, suffixes, spatial_ndim = "raw", (".raw",), 3
        shape = (4, 5, 6)

        def header(self, item):
            return 1, self.shape

        def read(self, item, region=None):
            vol = np.memmap(item.path, dtype="<f4", mode="r", shape=self.shape)
            return np.array(vol[self.slices(region)], dtype=np.float32)[None]

    assert get_reader("raw") is RawReader
    vol = RNG.random((4, 5, 6)).astype("<f4")
    (tmp_path / "img" / "sub").mkdir(parents=True)
    (tmp_path / "lab" / "sub").mkdir(parents=True)
    vol.tofile(tmp_path / "img" / "sub" / "a.raw")
    vol.tofile(tmp_path / "img" / "B.RAW")  # suffixes match case-insensitively
    np.floor(vol * 3).astype("<f4").tofile(tmp_path / "lab" / "sub" / "a.raw")
    np.floor(vol * 3).astype("<f4").tofile(tmp_path / "lab" / "B.RAW")
    reader = get_reader("raw")(spatial_ndim=3)
    items = reader.items(tmp_path / "img", tmp_path / "lab")
    assert [Path(i.path).relative_to(tmp_path / "img").as_posix() for i in items] == ["B.RAW", "sub/a.raw"]
    full = check_read(reader, items[1], (slice(1, 3), slice(None), slice(2, 6)))
    np.testing.assert_array_equal(full[0], vol)
    mask = reader.read_mask(items[1], (slice(1, 3), slice(None), slice(2, 6)))
    assert mask.dtype == np.int64
    np.testing.assert_array_equal(mask, np.floor(vol * 3)[1:3, :, 2:6])
    with pytest.raises(ValueError, match="reads 3D"):
        RawReader(spatial_ndim=2)


def test_registry_refuses_a_name_taken_by_another_class(registry):
    class First(Reader):
        name, suffixes, spatial_ndim = "dup", (".dup",), 2

    class Second(Reader):
        name, suffixes, spatial_ndim = "dup", (".dup",), 2

    assert register_reader(First) is First
    assert register_reader(First) is First  # the same class again is harmless
    with pytest.raises(ValueError, match="already registered"):
        register_reader(Second)
    assert get_reader("dup") is First
    with pytest.raises(ValueError, match="already registered"):
        register_reader(type("Images", (Reader,), {"name": "nifti", "suffixes": (".nii",), "spatial_ndim": 3}))

    class NoSuffixes(Reader):
        name, suffixes, spatial_ndim = "bad", ("RAW",), 2

    with pytest.raises(ValueError, match="suffixes"):
        register_reader(NoSuffixes)


# =========================================================================================== discovery
def test_missing_empty_and_non_directory_roots(tmp_path):
    reader = ImageFolderReader()
    raises([tmp_path / "nope", "does not exist", "--data.root"], reader.items, tmp_path / "nope")
    (tmp_path / "file.png").write_bytes(b"x")
    raises([tmp_path / "file.png", "not a directory", "--data.root"], reader.items, tmp_path / "file.png")
    empty = tmp_path / "empty"
    (empty / ".hidden").mkdir(parents=True)
    imwrite(empty / ".hidden" / "a.png", np.zeros((4, 4), np.uint8))  # hidden folders are skipped
    imwrite(empty / ".b.png", np.zeros((4, 4), np.uint8))  # hidden files too
    (empty / "notes.txt").write_text("not an image")
    for cls in (ImageFolderReader, NiftiReader):
        raises([empty, "--data.root", *cls.suffixes], cls().items, empty)
    raises([empty, ".npy", "--data.root"], NpyReader(2).items, empty)


def test_imagefolder_classes_labels_and_order(tmp_path):
    root = tmp_path / "train"
    for rel in ["dog/b.png", "dog/a.jpg", "cat/z.tif", "cat/deep/er/x.JPEG", "cat/.skip.png", "dog/read.me"]:
        if rel.endswith("read.me"):
            (root / rel).write_text("x")
        else:
            imwrite(root / rel, np.zeros((4, 5, 3), np.uint8))
    (root / "zebra").mkdir()  # an empty class folder still takes its index
    (root / ".git").mkdir()
    reader = ImageFolderReader()
    assert reader.classes(root) == ["cat", "dog", "zebra"]
    items = reader.items(root)
    rels = [Path(i.path).relative_to(root).as_posix() for i in items]
    assert rels == ["cat/deep/er/x.JPEG", "cat/z.tif", "dog/a.jpg", "dog/b.png"]
    assert [i.label for i in items] == [0, 0, 1, 1]
    assert all(os.path.isabs(i.path) and i.mask is None for i in items)
    assert reader.items(root) == items  # deterministic

    flat = tmp_path / "flat"
    imwrite(flat / "b.png", np.zeros((4, 4), np.uint8))
    imwrite(flat / "a.png", np.zeros((4, 4), np.uint8))
    assert [(Path(i.path).name, i.label) for i in reader.items(flat)] == [("a.png", None), ("b.png", None)]
    # Images directly in root make it no class tree, sub-folders or not: every label is None.
    imwrite(flat / "sub" / "c.png", np.zeros((4, 4), np.uint8))
    assert reader.classes(flat) == []
    assert [i.label for i in reader.items(flat)] == [None, None, None]


def test_masks_are_matched_by_relative_path_and_stem(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    imwrite(images / "a.jpg", smooth((6, 7, 3)))
    imwrite(images / "sub" / "b.png", smooth((6, 7)))
    imwrite(labels / "a.png", np.full((6, 7), 2, np.uint8))
    imwrite(labels / "sub" / "b.tif", np.full((6, 7), 300, np.uint16))
    imwrite(labels / "b.png", np.zeros((6, 7), np.uint8))  # another folder: not b's mask
    reader = ImageFolderReader()
    items = reader.items(images, labels)
    assert [Path(i.mask).relative_to(labels).as_posix() for i in items] == ["a.png", "sub/b.tif"]
    masks = [reader.read_mask(i) for i in items]
    assert all(m.dtype == np.int64 and m.shape == (6, 7) for m in masks)
    assert masks[0].max() == 2 and masks[1].min() == 300  # 16-bit classes survive
    np.testing.assert_array_equal(reader.read_mask(items[1], (slice(1, 4), slice(2, 3))), masks[1][1:4, 2:3])

    imwrite(labels / "sub" / "b.jpg", np.zeros((6, 7), np.uint8))  # neither has b.png's suffix: ambiguous
    raises([images / "sub" / "b.png", labels / "sub" / "b.tif", labels / "sub" / "b.jpg"], reader.items, images, labels)
    imwrite(labels / "sub" / "b.png", np.zeros((6, 7), np.uint8))
    assert Path(reader.items(images, labels)[1].mask).name == "b.png"  # the image's own suffix wins
    for name in ("b.tif", "b.jpg", "b.png"):
        os.remove(labels / "sub" / name)
    raises([images / "sub" / "b.png", labels, "--data.labels"], reader.items, images, labels)
    raises([tmp_path / "nolabels", "--data.labels"], reader.items, images, tmp_path / "nolabels")
    imwrite(images / "masks" / "a.png", np.zeros((6, 7), np.uint8))
    raises([images / "masks", "--data.labels"], reader.items, images, images / "masks")
    raises([items[0].path, "--data.labels"], reader.read_mask, Item(items[0].path))


def test_nifti_masks_match_nii_and_nii_gz(tmp_path):
    images, labels = tmp_path / "imagesTr", tmp_path / "labelsTr"
    images.mkdir()
    labels.mkdir()
    vol = RNG.normal(size=(5, 6, 7)).astype(np.float32)
    seg = RNG.integers(0, 4, (5, 6, 7)).astype(np.uint8)
    for name, label_name in [("a.nii.gz", "a.nii"), ("b.nii.gz", "b.nii.gz"), ("c.nii", "c.nii.gz")]:
        nib.save(nib.Nifti1Image(vol, np.eye(4)), images / name)
        nib.save(nib.Nifti1Image(seg, np.eye(4)), labels / label_name)
    reader = NiftiReader()
    items = reader.items(images, labels)
    assert [(Path(i.path).name, Path(i.mask).name) for i in items] == [
        ("a.nii.gz", "a.nii"),
        ("b.nii.gz", "b.nii.gz"),
        ("c.nii", "c.nii.gz"),
    ]
    for item in items:
        mask = reader.read_mask(item, (slice(1, 3), slice(None), slice(4, 7)))
        assert mask.dtype == np.int64
        np.testing.assert_array_equal(mask, seg[1:3, :, 4:7])
    # Two masks for one image: the one with the image's own suffix wins; otherwise it is ambiguous.
    nib.save(nib.Nifti1Image(seg, np.eye(4)), labels / "a.nii.gz")
    assert Path(reader.items(images, labels)[0].mask).name == "a.nii.gz"
    os.remove(images / "a.nii.gz")
    nib.save(nib.Nifti1Image(vol, np.eye(4)), images / "a.NII.GZ")
    assert Path(reader.items(images, labels)[0].mask).name == "a.nii.gz"  # suffixes compare case-insensitively
    nib.save(nib.Nifti1Image(seg, np.eye(4)), labels / "c.nii")
    assert Path(reader.items(images, labels)[2].mask).name == "c.nii"


# =========================================================================================== images
def _bgr_to_rgb(arr):
    return arr if arr.ndim == 2 else arr[:, :, [2, 1, 0, 3][: arr.shape[2]]]


LOSSLESS = [
    ("png", (9, 11), np.uint8),
    ("png", (9, 11), np.uint16),
    ("png", (9, 11, 3), np.uint8),
    ("png", (9, 11, 3), np.uint16),
    ("png", (9, 11, 4), np.uint8),
    ("png", (9, 11, 4), np.uint16),
    ("tif", (9, 11), np.uint8),
    ("tif", (9, 11), np.uint16),
    ("tiff", (9, 11, 3), np.uint8),
    ("tif", (9, 11, 3), np.uint16),
    ("tif", (9, 11, 4), np.uint8),
    ("tif", (9, 11), np.float32),
]


@pytest.mark.parametrize("suffix,shape,dtype", LOSSLESS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_lossless_images_keep_raw_values_in_rgb_order(tmp_path, suffix, shape, dtype):
    if dtype == np.float32:
        arr = RNG.normal(size=shape).astype(dtype) * 1000
    else:
        arr = RNG.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
    path = imwrite(tmp_path / f"img.{suffix}", arr)
    reader = ImageFolderReader(spatial_ndim=2)
    item = reader.items(tmp_path)[0]
    full = check_read(reader, item, (slice(2, 7), slice(3, 4)))
    expected = _bgr_to_rgb(arr)
    expected = expected[None] if expected.ndim == 2 else expected.transpose(2, 0, 1)
    np.testing.assert_array_equal(full, expected.astype(np.float32))
    assert item.path == str(path)


@pytest.mark.parametrize("shape", [(16, 24), (16, 24, 3)])
def test_jpeg_gray_and_colour(tmp_path, shape):
    arr = smooth(shape)
    imwrite(tmp_path / "img.jpg", arr)
    reader = ImageFolderReader()
    full = check_read(reader, reader.items(tmp_path)[0], (slice(0, 8), slice(5, 21)))
    expected = _bgr_to_rgb(arr)
    expected = expected[None] if expected.ndim == 2 else expected.transpose(2, 0, 1)
    assert np.abs(full - expected).mean() < 8  # lossy, but in RGB order with raw 0..255 values
    if len(shape) == 3:
        assert np.abs(full[::-1] - expected).mean() > 40


def test_colour_order_of_a_pure_blue_pixel(tmp_path):
    bgr = np.zeros((2, 2, 4), np.uint8)
    bgr[..., 0], bgr[..., 3] = 255, 128  # blue in OpenCV's BGRA, alpha 128
    imwrite(tmp_path / "blue.png", bgr)
    out = ImageFolderReader().read(Item(str(tmp_path / "blue.png")))
    assert out[:, 0, 0].tolist() == [0, 0, 255, 128]


HANDMADE = {
    "palette": (3, 8, [bytes([0, 1, 2, 1])] * 3, png_chunk(b"PLTE", bytes(range(9)))),
    "palette_trns": (3, 8, [bytes([0, 1, 2, 1])] * 3, png_chunk(b"PLTE", bytes(range(9))) + png_chunk(b"tRNS", b"\0")),
    "gray_alpha": (4, 8, [bytes(8)] * 3, b""),
    "rgb_trns": (2, 8, [bytes(12)] * 3, png_chunk(b"tRNS", bytes(6))),
    "gray_trns": (0, 8, [bytes(4)] * 3, png_chunk(b"tRNS", bytes(2))),
    "gray_1bit": (0, 1, [bytes([0b10100000])] * 3, b""),
    "gray_16bit": (0, 16, [bytes(8)] * 3, b""),
}


@pytest.mark.parametrize("kind", sorted(HANDMADE))
def test_png_header_matches_decoding_for_every_colour_type(tmp_path, kind):
    colour, depth, rows, extra = HANDMADE[kind]
    (tmp_path / "x.png").write_bytes(png_bytes(4, 3, colour, depth, rows, extra))
    reader = ImageFolderReader()
    check_read(reader, reader.items(tmp_path)[0], (slice(1, 3), slice(0, 2)))


def test_jpeg_header_beyond_large_app_segments(tmp_path):
    jpg = imwrite(tmp_path / "x.jpg", smooth((10, 12, 3))).read_bytes()
    app = b"".join(b"\xff\xe2" + struct.pack(">H", 65002) + RNG.bytes(65000) for _ in range(5))  # 325 kB
    (tmp_path / "x.jpg").write_bytes(jpg[:2] + app + jpg[2:])
    reader = ImageFolderReader()
    item = reader.items(tmp_path)[0]
    assert reader.header(item) == (3, (10, 12))
    check_read(reader, item, (slice(1, 3), slice(0, 2)))


def test_corrupt_and_empty_images(tmp_path):
    reader = ImageFolderReader()
    for name in ["junk.png", "junk.jpg", "junk.tif"]:
        (tmp_path / name).write_bytes(RNG.bytes(3000))
        item = Item(str(tmp_path / name))
        raises([item.path], reader.read, item)
        raises([item.path], reader.header, item)
    (tmp_path / "empty.png").write_bytes(b"")
    raises([tmp_path / "empty.png", "empty"], reader.read, Item(str(tmp_path / "empty.png")))
    raises([tmp_path / "gone.png"], reader.read, Item(str(tmp_path / "gone.png")))


def test_truncated_jpeg_is_refused_though_opencv_decodes_it(tmp_path):
    data = imwrite(tmp_path / "whole.jpg", RNG.integers(0, 255, (32, 40, 3), dtype=np.uint8)).read_bytes()
    reader = ImageFolderReader()
    for cut in [len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 2, len(data) - 1]:
        path = tmp_path / f"cut{cut}.jpg"
        path.write_bytes(data[:cut])
        raises([path, "truncated"], reader.read, Item(str(path)))
    # Trailing padding after the end-of-image marker is fine.
    (tmp_path / "padded.jpg").write_bytes(data + bytes(100))
    np.testing.assert_array_equal(
        reader.read(Item(str(tmp_path / "padded.jpg"))), reader.read(Item(str(tmp_path / "whole.jpg")))
    )


def test_truncated_jpeg_with_an_embedded_thumbnail(tmp_path):
    """The thumbnail inside APP1 ends with its own FFD9: a search for FFD9 anywhere would pass a cut-off file."""
    thumb = imwrite(tmp_path / "t.jpg", smooth((8, 8, 3))).read_bytes()
    main = imwrite(tmp_path / "m.jpg", RNG.integers(0, 255, (32, 40, 3), dtype=np.uint8)).read_bytes()
    app1 = b"\xff\xe1" + struct.pack(">H", len(thumb) + 8) + b"Exif\0\0" + thumb
    whole = main[:2] + app1 + main[2:]
    (tmp_path / "whole.jpg").write_bytes(whole)
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) - 300])
    reader = ImageFolderReader()
    assert reader.read(Item(str(tmp_path / "whole.jpg"))).shape == (3, 32, 40)
    raises([tmp_path / "cut.jpg", "truncated"], reader.read, Item(str(tmp_path / "cut.jpg")))


def test_truncated_png(tmp_path):
    data = imwrite(tmp_path / "whole.png", RNG.integers(0, 255, (32, 40), dtype=np.uint8)).read_bytes()
    reader = ImageFolderReader()
    for cut in [40, len(data) // 2, len(data) - 12, len(data) - 3]:  # ... down to a missing IEND
        path = tmp_path / f"cut{cut}.png"
        path.write_bytes(data[:cut])
        raises([path], reader.read, Item(str(path)))


def test_image_mask_errors(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    imwrite(images / "rgb.png", np.zeros((6, 7), np.uint8))
    imwrite(images / "small.png", np.zeros((6, 7), np.uint8))
    imwrite(images / "pal.png", np.zeros((3, 4), np.uint8))
    imwrite(labels / "rgb.png", np.zeros((6, 7, 3), np.uint8))
    imwrite(labels / "small.png", np.zeros((5, 7), np.uint8))
    (labels / "pal.png").write_bytes(png_bytes(4, 3, 3, 8, [bytes(4)] * 3, png_chunk(b"PLTE", bytes(6))))
    reader = ImageFolderReader()
    items = {Path(i.path).stem: i for i in reader.items(images, labels)}
    raises([labels / "rgb.png", "3 channels"], reader.read_mask, items["rgb"])
    raises(
        [labels / "small.png", images / "small.png", "(5, 7)", "(6, 7)", "--data.labels"],
        reader.read_mask,
        items["small"],
    )
    raises([labels / "pal.png", "palette"], reader.read_mask, items["pal"])


# =========================================================================================== NIfTI
def nifti(path: Path, arr: np.ndarray, endianness: str | None = None) -> Path:
    header = nib.Nifti1Header(endianness=endianness) if endianness else None
    nib.save(nib.Nifti1Image(arr, np.eye(4), header=header), path)
    return path


@pytest.mark.parametrize(
    "dtype,name",
    [(np.int16, "v.nii"), (np.uint8, "v.nii"), (np.float64, "v.nii"), (np.float32, "v.nii.gz"), (np.int16, "v.nii.gz")],
)
def test_nifti_dtypes(tmp_path, dtype, name):
    vol = (RNG.normal(size=(6, 7, 8)) * 50 + 60).astype(dtype)
    nifti(tmp_path / name, vol)
    reader = NiftiReader(spatial_ndim=3)
    full = check_read(reader, reader.items(tmp_path)[0], (slice(1, 4), slice(0, 7, 2), slice(5, 8)))
    np.testing.assert_array_equal(full, vol[None].astype(np.float32))


def test_nifti_big_endian_and_scaled(tmp_path):
    vol = RNG.integers(-1000, 1000, (9, 10, 11)).astype(np.int16)
    nifti(tmp_path / "be.nii", vol, endianness=">")
    assert nib.load(tmp_path / "be.nii").get_data_dtype().byteorder == ">"
    reader = NiftiReader()
    full = check_read(reader, Item(str(tmp_path / "be.nii")), (slice(0, 2), slice(3, 4), slice(None)))
    assert full.dtype.byteorder in "=|<"
    np.testing.assert_array_equal(full[0], vol)

    nifti(tmp_path / "scaled.nii", vol)  # then set scl_slope = 2, scl_inter = 1 in the header bytes
    with open(tmp_path / "scaled.nii", "r+b") as f:
        f.seek(112)
        f.write(struct.pack("<ff", 2.0, 1.0))
    full = check_read(reader, Item(str(tmp_path / "scaled.nii")), (slice(0, 2), slice(3, 4), slice(None)))
    np.testing.assert_array_equal(full[0], vol.astype(np.float32) * 2 + 1)


def test_nifti_4d_is_channels_first(tmp_path):
    vol = RNG.normal(size=(9, 10, 11, 2)).astype(np.float32)
    nifti(tmp_path / "v.nii.gz", vol)
    reader = NiftiReader()
    item = Item(str(tmp_path / "v.nii.gz"))
    assert reader.header(item) == (2, (9, 10, 11))
    full = check_read(reader, item, (slice(1, 8), slice(None), slice(6, 11)))
    np.testing.assert_array_equal(full, np.moveaxis(vol, -1, 0))


def test_nifti_tiles_of_a_compressed_volume_share_one_decompression(tmp_path, monkeypatch):
    vol = RNG.normal(size=(9, 10, 11)).astype(np.float32)
    item = Item(str(nifti(tmp_path / "v.nii.gz", vol)))
    reader = NiftiReader()
    calls = []
    get_unscaled = nib.arrayproxy.ArrayProxy.get_unscaled
    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "get_unscaled", lambda self: calls.append(1) or get_unscaled(self))
    for x in range(0, 9, 3):
        region = (slice(x, x + 3), slice(2, 10), slice(None))
        np.testing.assert_array_equal(reader.read(item, region)[0], vol[region])
    assert len(calls) == 1
    new = RNG.normal(size=(9, 10, 12)).astype(np.float32)  # the file changes: read again
    nifti(tmp_path / "v.nii.gz", new)
    np.testing.assert_array_equal(reader.read(item)[0], new)
    assert len(calls) == 2
    monkeypatch.setattr(NiftiReader, "cache_bytes", 100)  # too large to keep: every read decompresses
    reader = NiftiReader()
    for _ in range(2):
        np.testing.assert_array_equal(reader.read(item)[0], new)
    assert len(calls) == 4


@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<i2", ">i2", "<f8", "u1"])
@pytest.mark.parametrize("shape", [(1, 9, 10, 11), (3, 9, 10, 11), (2, 12, 13)])
def test_fortran_ordered_data_is_reordered_exactly(shape, dtype):
    data = np.asfortranarray((RNG.normal(size=shape) * 40).astype(dtype))
    fortran_spatial = np.stack([np.asfortranarray(c) for c in data])  # channels outermost, x fastest
    for source in (data, fortran_spatial, fortran_spatial[:, 1:8, ::2], fortran_spatial[:, ::2, 1:9]):
        out = readers.base.float32_c(source)
        assert out.flags.c_contiguous and out.dtype == np.float32
        np.testing.assert_array_equal(out, source.astype(np.float32))


def test_nifti_bad_dims_and_corrupt_files(tmp_path):
    reader = NiftiReader()
    nifti(tmp_path / "flat.nii", np.zeros((4, 5), np.float32))
    nifti(tmp_path / "5d.nii", np.zeros((2, 3, 4, 1, 2), np.float32))
    for name in ["flat.nii", "5d.nii"]:
        raises([tmp_path / name, "3D", "4D"], reader.header, Item(str(tmp_path / name)))
    for name in ["junk.nii", "junk.nii.gz"]:
        (tmp_path / name).write_bytes(RNG.bytes(2000))
        raises([tmp_path / name], reader.header, Item(str(tmp_path / name)))
        raises([tmp_path / name], reader.read, Item(str(tmp_path / name)))
    (tmp_path / "empty.nii").write_bytes(b"")
    raises([tmp_path / "empty.nii"], reader.read, Item(str(tmp_path / "empty.nii")))
    with pytest.raises(ValueError, match="reads 3D"):
        NiftiReader(spatial_ndim=2)


def test_truncated_nifti(tmp_path):
    vol = RNG.normal(size=(10, 11, 12)).astype(np.float32)
    reader = NiftiReader()
    for name in ["v.nii", "v.nii.gz"]:
        data = nifti(tmp_path / name, vol).read_bytes()
        for cut in [200, len(data) // 2, len(data) - 5]:
            path = tmp_path / f"cut{cut}_{name}"
            path.write_bytes(data[:cut])
            item = Item(str(path))
            raises([path], reader.read, item)
            # A region whose bytes are all present is refused too: the file is checked, not only the region.
            raises([path], reader.read, item, (slice(0, 1), slice(0, 1), slice(0, 1)))
            raises([path], reader.header, item)


def test_nifti_multi_member_gzip_is_accepted(tmp_path):
    """bgzip-style files (several gzip members) have a last-member trailer that is not the total size."""
    vol = RNG.normal(size=(6, 7, 8)).astype(np.float32)
    raw = nifti(tmp_path / "v.nii", vol).read_bytes()
    half = len(raw) // 2
    (tmp_path / "multi.nii.gz").write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))
    out = NiftiReader().read(Item(str(tmp_path / "multi.nii.gz")))
    np.testing.assert_array_equal(out[0], vol)


def test_nifti_label_errors(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for name in ["frac", "shape", "ok"]:
        nifti(images / f"{name}.nii.gz", np.zeros((4, 5, 6), np.float32))
    nifti(labels / "frac.nii.gz", np.full((4, 5, 6), 0.5, np.float32))
    nifti(labels / "shape.nii.gz", np.zeros((4, 5, 7), np.uint8))
    nifti(labels / "ok.nii.gz", np.full((4, 5, 6), 3.0, np.float32))  # whole numbers stored as float
    reader = NiftiReader()
    items = {Path(i.path).name.split(".")[0]: i for i in reader.items(images, labels)}
    raises([labels / "frac.nii.gz", "whole"], reader.read_mask, items["frac"])
    raises(
        [labels / "shape.nii.gz", images / "shape.nii.gz", "(4, 5, 7)", "(4, 5, 6)", "--data.labels"],
        reader.read_mask,
        items["shape"],
    )
    assert (reader.read_mask(items["ok"]) == 3).all()


# =========================================================================================== npy
@pytest.mark.parametrize(
    "ndim,shape",
    [(2, (9, 10)), (2, (3, 9, 10)), (3, (5, 6, 7)), (3, (2, 5, 6, 7))],
    ids=["2d", "2d-channels", "3d", "3d-channels"],
)
@pytest.mark.parametrize("dtype", ["<f4", ">f4", "u1", "<i2", "f8", "?"])
def test_npy_layouts_and_dtypes(tmp_path, ndim, shape, dtype):
    arr = (RNG.normal(size=shape) * 40).astype(dtype)
    np.save(tmp_path / "a.npy", arr)
    reader = NpyReader(spatial_ndim=ndim)
    item = reader.items(tmp_path)[0]
    region = (slice(1, 4), slice(2, 9, 3), slice(0, 2))[:ndim]
    full = check_read(reader, item, region)
    expected = arr if len(shape) == ndim + 1 else arr[None]
    np.testing.assert_array_equal(full, expected.astype(np.float32))


def test_npy_fortran_order(tmp_path):
    arr = np.asfortranarray(RNG.normal(size=(2, 5, 6)).astype(np.float32))
    np.save(tmp_path / "f.npy", arr)
    full = check_read(NpyReader(2), Item(str(tmp_path / "f.npy")), (slice(1, 3), slice(2, 6)))
    np.testing.assert_array_equal(full, arr)


def test_npy_reads_through_a_memory_map(tmp_path, monkeypatch):
    arr = RNG.normal(size=(3, 20, 30)).astype(np.float32)
    np.save(tmp_path / "a.npy", arr)
    calls = []
    real_load = np.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        out = real_load(*args, **kwargs)
        assert isinstance(out, np.memmap)
        return out

    monkeypatch.setattr(np, "load", spy)
    out = NpyReader(2).read(Item(str(tmp_path / "a.npy")), (slice(5, 9), slice(10, 12)))
    np.testing.assert_array_equal(out, arr[:, 5:9, 10:12])
    assert calls and all(c.get("mmap_mode") == "r" and not c.get("allow_pickle") for c in calls)


def test_npy_needs_spatial_ndim():
    for bad in (None, 1, 4):
        with pytest.raises(ValueError, match="spatial_ndim"):
            NpyReader(bad)


def test_npy_bad_arrays(tmp_path, monkeypatch):
    reader = NpyReader(spatial_ndim=2)
    np.save(tmp_path / "vec.npy", np.zeros(5))
    np.save(tmp_path / "5d.npy", np.zeros((1, 2, 3, 4, 5)))
    for name, shape in [("vec", "(5,)"), ("5d", "(1, 2, 3, 4, 5)")]:
        raises([tmp_path / f"{name}.npy", shape, "channels first"], reader.header, Item(str(tmp_path / f"{name}.npy")))
    np.save(tmp_path / "complex.npy", np.zeros((3, 3), np.complex64))
    raises([tmp_path / "complex.npy", "complex64"], reader.read, Item(str(tmp_path / "complex.npy")))

    np.save(tmp_path / "obj.npy", np.array([[{"a": 1}, None]], dtype=object), allow_pickle=True)
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load must not be reached for an object array"))
    for fn in (reader.header, reader.read):
        raises([tmp_path / "obj.npy", "object"], fn, Item(str(tmp_path / "obj.npy")))
    monkeypatch.undo()

    np.save(tmp_path / "whole.npy", RNG.normal(size=(30, 40)))
    data = (tmp_path / "whole.npy").read_bytes()
    for cut in [5, 60, len(data) // 2, len(data) - 1]:
        path = tmp_path / f"cut{cut}.npy"
        path.write_bytes(data[:cut])
        raises([path], reader.read, Item(str(path)))
        raises([path], reader.header, Item(str(path)))
    (tmp_path / "junk.npy").write_bytes(RNG.bytes(500))
    raises([tmp_path / "junk.npy"], reader.read, Item(str(tmp_path / "junk.npy")))


def test_npy_masks(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    seg = RNG.integers(0, 5, (5, 6, 7))
    for name in ["a", "b", "frac", "shape"]:
        np.save(images / f"{name}.npy", np.zeros((2, 5, 6, 7), np.float32))
    np.save(labels / "a.npy", seg.astype(np.int32))
    np.save(labels / "b.npy", seg[None].astype(np.uint8))  # (1, *S) is one channel too
    np.save(labels / "frac.npy", np.full((5, 6, 7), 1.5))
    np.save(labels / "shape.npy", np.zeros((5, 6, 8), np.int64))
    reader = NpyReader(spatial_ndim=3)
    items = {Path(i.path).stem: i for i in reader.items(images, labels)}
    region = (slice(1, 3), slice(None), slice(4, 7))
    for name in ["a", "b"]:
        mask = reader.read_mask(items[name], region)
        assert mask.dtype == np.int64
        np.testing.assert_array_equal(mask, seg[region])
    raises([labels / "frac.npy", "whole"], reader.read_mask, items["frac"])
    raises([labels / "shape.npy", images / "shape.npy", "--data.labels"], reader.read_mask, items["shape"])


def test_region_must_be_one_slice_per_spatial_axis(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 5)))
    reader = NpyReader(2)
    with pytest.raises(ValueError, match="2 slices"):
        reader.read(Item(str(tmp_path / "a.npy")), (slice(0, 2),))
    with pytest.raises(ValueError, match="2 slices"):
        reader.read(Item(str(tmp_path / "a.npy")), (0, slice(0, 2)))


def test_module_docstring_shows_a_new_reader():
    assert "@register_reader" in readers.__doc__ and "def read(" in readers.__doc__


class _Unused(Reader):
    name: ClassVar[str] = "unused"  # never registered: defining a Reader subclass alone changes nothing
    suffixes = (".unused",)
    spatial_ndim = 2


def test_unregistered_subclass_is_not_found():
    raises(["unused"], get_reader, "unused")
