"""Small data sets on disk for the data tests: NumPy arrays, NIfTI volumes, image-folder trees, and
the trainer's flags for the arrays.

Every sample carries its own identity in its pixels (file number and position), so a test can
tell which file and tile a batch came from by looking at the batch alone.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import nibabel as nib
import numpy as np


def volume(k: int, shape, channels: int = 1, seed: int = 0) -> np.ndarray:
    """(channels, *shape) float32: smooth structure + noise, different for every ``k``."""
    rng = np.random.default_rng([seed, k])
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    base = sum(np.sin((2 + i + k % 3) * g + k) for i, g in enumerate(grids))
    out = np.stack([base * (c + 1) + 0.1 * rng.standard_normal(shape) + 10 * k for c in range(channels)])
    return out.astype(np.float32)


def npy_dataset(root: Path, files: int, shape, channels: int = 1, seed: int = 0) -> Path:
    """``files`` arrays (channels-first when channels > 1) in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for k in range(files):
        x = volume(k, shape, channels, seed)
        np.save(root / f"f{k:03d}.npy", x if channels > 1 else x[0])
    return root


def nifti_dataset(root: Path, files: int, shape, classes: int = 3, labels: Path | None = None) -> Path:
    """``files`` int16 volumes, and (with ``labels``) integer label volumes of the same names."""
    root.mkdir(parents=True, exist_ok=True)
    for k in range(files):
        x = volume(k, shape)[0]
        nib.save(nib.Nifti1Image((x * 100).astype(np.int16), np.eye(4)), root / f"vol{k:02d}.nii.gz")
        if labels is not None:
            labels.mkdir(parents=True, exist_ok=True)
            seg = np.digitize(x - 10 * k, np.linspace(-2, 2, classes - 1)).astype(np.uint8)
            nib.save(nib.Nifti1Image(seg, np.eye(4)), labels / f"vol{k:02d}.nii.gz")
    return root


def image_folder(root: Path, classes: int, per_class: int, size=(24, 20), ext: str = ".png") -> Path:
    """An ImageNet-style tree: ``classes`` sub-folders of RGB images whose colour depends on the class."""
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            rng = np.random.default_rng([c, k])
            img = np.zeros((*size, 3), np.uint8)
            img[..., c % 3] = 200
            img += rng.integers(0, 40, img.shape, dtype=np.uint8)
            cv2.circle(img, (size[1] // 2, size[0] // 2), 3 + k % 4, (255, 255, 255), -1)
            cv2.imwrite(str(folder / f"img{k:02d}{ext}"), img)
    return root


def npy_train_args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    """Trainer flags for 16x16 one-channel tiles of the arrays in ``root`` (an :func:`npy_dataset`)."""
    return [
        *["--data.kind", "npy", "--data.root", str(root), "--data.tile", "16", "16", "--arch.img-size", "16", "16"],
        *["--arch.in-chans", "1", "--data.global-batch-size", "8", "--metrics.log-every", "1"],
        *["--run.dir", str(run_dir), *extra],
    ]
