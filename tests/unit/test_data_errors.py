"""Bad data is named where it enters: a non-finite sample, a file gone since the index was cached, a data
root that vanished under --data.skip-bad-files, class labels beyond the model's classes."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from ucfvit.data.config import DatasetConfig
from ucfvit.data.dataset import FileSource, InputSpec
from ucfvit.data.index import build_index, load_index, save_index
from ucfvit.data.readers import DataError, get_reader

SPEC = InputSpec(img_size=(8, 8), channels=1, variables=("x",))


def npy_dataset(root: Path, count: int = 4, nan_in: int | None = None) -> DatasetConfig:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        arr = np.arange(64, dtype=np.float32).reshape(8, 8) + i
        if i == nan_in:
            arr[5, 3] = np.nan
        np.save(root / f"f{i}.npy", arr)
    return DatasetConfig(kind="npy", root=root)


def source(cfg: DatasetConfig, skip: bool = False, spec: InputSpec = SPEC, index=None) -> FileSource:
    reader = get_reader(cfg.kind)(spatial_ndim=2)
    return FileSource("d", cfg, index or build_index("d", cfg, reader, spec.img_size), spec, skip)


def test_a_non_finite_value_is_a_data_error_naming_the_file_and_is_skipped_on_request(tmp_path, capsys):
    cfg = npy_dataset(tmp_path / "data", nan_in=1)
    with pytest.raises(DataError, match=r"f1\.npy: holds a non-finite value \(nan in channel 0 at \(5, 3\)\)"):
        source(cfg).sample(1)
    sample = source(cfg, skip=True).sample(1)  # the next file's tile instead
    assert np.isfinite(sample["image"].numpy()).all()
    assert "f1.npy: holds a non-finite value" in capsys.readouterr().err


def test_a_file_gone_since_the_index_was_cached_names_the_index(tmp_path):
    cfg = npy_dataset(tmp_path / "data")
    reader = get_reader("npy")(spatial_ndim=2)
    saved = tmp_path / "run" / "data" / "index.json"
    save_index(saved, {"k": 1}, {"d": build_index("d", cfg, reader, (8, 8))})
    index = load_index(saved, {"k": 1})["d"]
    (tmp_path / "data" / "f2.npy").unlink()
    with pytest.raises(DataError, match=rf"f2\.npy: the file is gone since the data index {saved} was built; delete"):
        source(cfg, index=index).sample(2)


def test_a_vanished_root_under_skip_bad_files_stops_at_once(tmp_path, capsys):
    cfg = npy_dataset(tmp_path / "data", count=50)
    data = source(cfg, skip=True)
    shutil.rmtree(tmp_path / "data")
    with pytest.raises(DataError, match=r"data: the folder of dataset 'd' \(--data.root\) is gone since the run"):
        data.sample(0)
    assert "skipping" not in capsys.readouterr().err  # not one line per sample of the dataset


def test_class_folders_beyond_the_models_classes_are_refused_when_the_dataset_is_built(tmp_path):
    root = tmp_path / "images"
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
        cv2.imwrite(str(root / name / "x.png"), np.full((8, 8), 7, np.uint8))
    cfg = DatasetConfig(kind="imagefolder", root=root)
    spec = InputSpec(img_size=(8, 8), channels=1, variables=("x",), num_classes=2, needs=("label",))
    with pytest.raises(DataError, match=r"c/x\.png: its class label 2 is outside the model's 2 classes"):
        source(cfg, spec=spec)
    assert source(cfg, spec=InputSpec((8, 8), 1, ("x",), 3, ("label",))).sample(2)["label"] == 2
