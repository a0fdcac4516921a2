"""Files we did not write are read within bounds: a small file that declares gigabytes (an image, a
.nii.gz, a .pth, a YAML config of aliases, deeply nested JSON) is refused from its header, and a FIFO
where a file is expected is refused by name without being opened. Each refusal is one error that
names the file. The peak memory of these refusals is checked in tests/e2e/test_bounded_inputs.py."""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
import torch

from bombs import deep_json, nifti_gz_declaring, png_declaring, pth_declaring, yaml_aliases
from ucfvit.data.config import DatasetConfig
from ucfvit.data.index import build_index, load_index
from ucfvit.data.readers import DataError, ImageFolderReader, Item, NiftiReader, NpyReader
from ucfvit.data.readers.headers import MAX_IMAGE_PIXELS
from ucfvit.files import MAX_DEPTH, check_depth
from ucfvit.interop import WeightsError, read_weights
from ucfvit.train.cli import parse
from ucfvit.train.config import ConfigError, read_config_file
from ucfvit.train.data_setup import _first_file, adapt_to_data
from ucfvit.train.export import CONFIG_FILE, MODEL_FILE, read_export_spec


def jpeg_declaring(path: Path, width: int, height: int) -> Path:
    """A JPEG whose frame header declares ``width`` x ``height`` (and holds no scan)."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    path.write_bytes(b"\xff\xd8" + b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + bytes(9) + sof + b"\xff\xd9")
    return path


def tiff_declaring(path: Path, width: int, height: int, order: str, big: bool) -> Path:
    """A TIFF (classic or BigTIFF, either byte order) whose first IFD declares ``width`` x ``height``."""
    magic = {"<": b"II", ">": b"MM"}[order] + struct.pack(order + "H", 43 if big else 42)
    if big:  # header: magic, offset size 8, 0, first IFD at 16; entries of 20 bytes
        head = magic + struct.pack(order + "HHQ", 8, 0, 16)
        entries = [struct.pack(order + "HHQQ", tag, 16, 1, value) for tag, value in ((256, width), (257, height))]
        ifd = struct.pack(order + "Q", 2) + b"".join(entries) + struct.pack(order + "Q", 0)
    else:
        head = magic + struct.pack(order + "I", 8)
        entries = [struct.pack(order + "HHII", tag, 4, 1, value) for tag, value in ((256, width), (257, height))]
        ifd = struct.pack(order + "H", 2) + b"".join(entries) + struct.pack(order + "I", 0)
    path.write_bytes(head + ifd)
    return path


def refused(match: str, fn, *args, error: type[Exception] = DataError) -> str:
    """``fn(*args)`` raises ``error`` with one line that matches ``match``."""
    with pytest.raises(error, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value), str(info.value)
    return str(info.value)


# ------------------------------------------------------------------------------------------ images
def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(tmp_path):
    png = png_declaring(tmp_path / "bomb.png", 30000, 30000)  # 870 KiB that decodes to 900 MB
    assert png.stat().st_size < 1 << 20
    bombs = [png, jpeg_declaring(tmp_path / "bomb.jpg", 30000, 30000)]
    bombs += [
        tiff_declaring(tmp_path / f"bomb{i}.tif", 30000, 30000, o, b)
        for i, (o, b) in enumerate([("<", False), (">", False), ("<", True), (">", True)])
    ]
    reader = ImageFolderReader()
    for path in bombs:
        match = rf"{path.name}: the image declares 30000 x 30000 pixels, more than the 268,435,456 that ucfvit decodes"
        refused(match, reader.header, Item(str(path)))
        refused(match, reader.read, Item(str(path)))


def test_the_pixel_limit_holds_for_real_images_and_opencv_gets_it(tmp_path, monkeypatch):
    assert os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] == str(MAX_IMAGE_PIXELS) == str(ImageFolderReader.max_pixels)
    image = np.zeros((30, 40, 3), np.uint8)
    for suffix in (".png", ".jpg", ".tif"):
        assert cv2.imwrite(str(tmp_path / f"a{suffix}"), image)
    reader = ImageFolderReader()
    monkeypatch.setattr(ImageFolderReader, "max_pixels", 30 * 40)
    for suffix in (".png", ".jpg", ".tif"):  # the limit itself is fine
        assert reader.header(Item(str(tmp_path / f"a{suffix}"))) == (3, (30, 40))
    monkeypatch.setattr(ImageFolderReader, "max_pixels", 30 * 40 - 1)
    for suffix in (".png", ".jpg", ".tif"):  # OpenCV's own TIFF is parsed too
        refused(r"declares 40 x 30 pixels, more than the 1,199", reader.read, Item(str(tmp_path / f"a{suffix}")))


# ------------------------------------------------------------------------------------------ NIfTI
def test_a_compressed_volume_too_large_to_decompress_is_refused_from_its_header(tmp_path):
    bomb = nifti_gz_declaring(tmp_path / "bomb.nii.gz", (1400, 1400, 1400))  # 2.7 MB holding 2.7 GB
    assert bomb.stat().st_size < 4 << 20
    match = r"bomb\.nii\.gz: it holds 2,617 MiB decompressed .* more than the 1,024 MiB .* gunzip it"
    refused(match, NiftiReader().header, Item(str(bomb)))
    refused(match, NiftiReader().read, Item(str(bomb)), (slice(0, 8),) * 3)


def test_nifti_extensions_are_bounded_by_the_data_offset(tmp_path, monkeypatch):
    """nibabel reads header extensions up to the data offset into memory: that offset is checked first."""
    monkeypatch.setattr(NiftiReader, "max_gz_bytes", 64 << 10)
    header = nib.Nifti1Header()
    header.set_data_shape((4, 4, 4))
    header["vox_offset"] = 1 << 20  # 1 MiB of "extensions" before 64 bytes of data
    path = tmp_path / "ext.nii.gz"
    path.write_bytes(gzip.compress(header.binaryblock + b"\x01" + bytes(3) + struct.pack("<ii", (1 << 20) - 352, 0)))
    refused(
        r"ext\.nii\.gz: its header puts the data at byte 1048576 \(vox_offset\)", NiftiReader().header, Item(str(path))
    )


# ------------------------------------------------------------------------------------------ FIFOs
@pytest.mark.parametrize("kind", ["imagefolder", "nifti", "npy"])
def test_a_fifo_data_file_is_listed_and_refused_by_name_never_opened(tmp_path, kind, capsys):
    root = tmp_path / "root"
    root.mkdir()
    if kind == "imagefolder":
        cv2.imwrite(str(root / "b.png"), np.zeros((8, 8), np.uint8))
        fifo, reader = root / "a.png", ImageFolderReader()
    elif kind == "nifti":
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), root / "b.nii.gz")
        fifo, reader = root / "a.nii.gz", NiftiReader()
    else:
        np.save(root / "b.npy", np.zeros((8, 8), np.float32))
        fifo, reader = root / "a.npy", NpyReader(2)
    os.mkfifo(fifo)
    items = reader.items(root)
    assert [Path(i.path).name for i in items] == [fifo.name, f"b{fifo.name[1:]}"]  # listed, so it is named
    match = rf"{fifo.name}: a.* must be a regular file, but this is a FIFO"
    refused(match, reader.header, items[0])
    refused(match, reader.read, items[0])
    cfg = DatasetConfig(kind=kind, root=root, tile=(8, 8) if kind != "nifti" else (8, 8, 8))
    size = cfg.tile
    refused(match, build_index, "d", cfg, reader, size)
    index = build_index("d", cfg, reader, size, skip_bad_files=True)
    assert [Path(e["path"]).name for e in index.entries] == [f"b{fifo.name[1:]}"]
    assert f"skipping {fifo}" in capsys.readouterr().err


def test_the_channel_count_comes_from_the_first_regular_file(tmp_path):
    """The data decides --arch.in-chans from its first file: a FIFO first is passed over, never opened."""
    root = tmp_path / "root"
    (root / "c0").mkdir(parents=True)
    (root / "c1").mkdir()
    os.mkfifo(root / "c0" / "a.png")
    for name in ("c0/b.png", "c1/a.png"):
        cv2.imwrite(str(root / name), np.zeros((8, 8), np.uint8))
    assert _first_file(root, ImageFolderReader.suffixes) == str(root / "c0" / "b.png")
    cfg = parse(["--model", "vit", "--data.kind", "imagefolder", "--data.root", str(root)])
    adapt_to_data(cfg)
    assert cfg.arch.in_chans == 1 and cfg.arch.num_classes == 2


def test_a_fifo_or_huge_cached_index_is_refused_by_name(tmp_path):
    index = tmp_path / "index.json"
    assert load_index(index, {}) is None  # none yet: build it
    os.mkfifo(index)
    refused(
        r"index\.json: the cached data index must be a regular file, but this is a FIFO.*delete it",
        load_index,
        index,
        {},
    )
    index.unlink()
    with open(index, "wb") as f:
        f.truncate(3 << 30)  # sparse
    refused(r"index\.json: the cached data index holds 3072 MiB, more than the 1024 MiB", load_index, index, {})
    index.write_text("[" * 100_000 + "]" * 100_000)
    assert load_index(index, {}) is None  # not an index of these options: built again


# ------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", ["config.json", "config.yaml"])
def test_a_fifo_or_oversized_config_is_refused_without_reading_it(tmp_path, name):
    path = tmp_path / name
    os.mkfifo(path)
    refused(
        rf"{name}: --config file must be a regular file, but this is a FIFO", read_config_file, path, error=ConfigError
    )
    path.unlink()
    with open(path, "wb") as f:
        f.truncate(3 << 30)
    refused(rf"{name}: --config file holds 3072 MiB, more than the 1 MiB", read_config_file, path, error=ConfigError)


def test_deeply_nested_json_config_is_one_error(tmp_path):
    refused(r"deep\.json: nested too deeply", read_config_file, deep_json(tmp_path / "deep.json"), error=ConfigError)
    # Shallow enough for the parser, too deep for what walks it afterwards:
    refused(
        rf"deep\.json: it is nested too deeply to be read \(more than {MAX_DEPTH} levels\)",
        read_config_file,
        deep_json(tmp_path / "deep.json", 500),
        error=ConfigError,
    )
    assert check_depth({"a": [[1]] * 3}, "x", "y") == {"a": [[1]] * 3}


def test_yaml_aliases_and_deep_yaml_are_refused(tmp_path):
    pytest.importorskip("yaml")  # optional: without PyYAML a .yaml config is refused as such
    bomb = yaml_aliases(tmp_path / "bomb.yaml")
    assert bomb.stat().st_size < 1024
    refused(
        r"bomb\.yaml: YAML aliases are not supported in a config \('a0' at line 4\)",
        read_config_file,
        bomb,
        error=ConfigError,
    )
    for deep in ("[" * 100_000 + "]" * 100_000, "\n  " + "- " * 100_000 + "x"):  # flow and block style
        (tmp_path / "deep.yaml").write_text("a: " + deep)
        refused(r"deep\.yaml: nested too deeply", read_config_file, tmp_path / "deep.yaml", error=ConfigError)
    (tmp_path / "ok.yaml").write_text("model: vit\noptim:\n  lr: 0.5\n")
    assert read_config_file(tmp_path / "ok.yaml") == {"model": "vit", "optim": {"lr": 0.5}}


# ------------------------------------------------------------------------------------------ weights
def test_a_pth_zip_that_inflates_far_beyond_its_size_is_refused_before_torch_load(tmp_path):
    bomb = pth_declaring(tmp_path / "bomb.pth", 1 << 24)  # 64 MiB of zeros in 64 KiB
    assert bomb.stat().st_size < 1 << 17
    refused(
        r"bomb\.pth: refused: its zip members declare 64 MiB, more than 8 times", read_weights, bomb, error=WeightsError
    )
    small = pth_declaring(tmp_path / "small.pth", 1000)  # deflated, but within bounds: read
    assert read_weights(small)["w"].shape == (1000,)
    torch.save({"w": torch.ones(3)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert read_weights(tmp_path / "legacy.pth")["w"].tolist() == [1, 1, 1]


def test_weights_that_are_a_fifo_or_declare_a_huge_safetensors_header_are_refused(tmp_path):
    os.mkfifo(tmp_path / "w.pth")
    refused(
        r"w\.pth: a weights file must be a regular file, but this is a FIFO",
        read_weights,
        tmp_path / "w.pth",
        error=WeightsError,
    )
    # safetensors bounds its own header: a length of 2**40 is refused, not allocated.
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    refused(
        r"w\.safetensors: not a readable safetensors file", read_weights, tmp_path / "w.safetensors", error=WeightsError
    )


def test_an_export_config_that_is_a_fifo_huge_or_deep_is_one_error(tmp_path):
    weights, config = tmp_path / MODEL_FILE, tmp_path / CONFIG_FILE
    weights.write_bytes(b"unused")
    os.mkfifo(config)
    refused(
        r"model_config\.json: an export file must be a regular file, but this is a FIFO",
        read_export_spec,
        weights,
        config,
        error=ValueError,
    )
    config.unlink()
    with open(config, "wb") as f:
        f.truncate(3 << 30)
    refused(
        r"model_config\.json: the export's model config holds 3072 MiB",
        read_export_spec,
        weights,
        config,
        error=ValueError,
    )
    config.write_text(
        json.dumps({"model": "vit", "size": "debug", "kwargs": {}})[:-3] + '{"a": ' + "[" * 300 + "]" * 300 + "}}"
    )
    refused(
        r"model_config\.json: the export's model config is nested too deeply",
        read_export_spec,
        weights,
        config,
        error=ValueError,
    )
