"""The data options of a run (``--data.*``), as typed dataclasses.

One dataset is described by the top-level ``--data.*`` options (:class:`DatasetConfig`); several
at once by ``data.datasets`` in a ``--config`` file, a mapping of names to :class:`DatasetConfig`
(e.g. ``{"ct": {"kind": "nifti", "root": "/data/ct", "tile": [64, 64, 64]}, ...}``). The rest of
:class:`DataConfig` (batch sizes, loader workers, adaptive patching) applies to every dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

__all__ = ["DataConfig", "DatasetConfig"]


@dataclass
class DatasetConfig:
    """One dataset: where its files are, how to read, tile, split and normalise them."""

    kind: str = "synthetic"
    """Reader, by registered name: ``synthetic`` (no files), ``imagefolder`` (JPEG/PNG/TIFF in class
    sub-folders), ``nifti`` (.nii/.nii.gz), ``npy`` (NumPy arrays, memory-mapped)."""
    root: Path | None = None
    """Directory of the files (searched recursively)."""
    labels: Path | None = None
    """Directory of per-pixel label masks/volumes, matched to the images by relative path and name."""
    variables: tuple[str, ...] | None = None
    """Names of the files' channels, in order; the model's ``--arch.variables`` are picked from them by
    name (None: the files' channels are the model's, in order)."""
    normalize: Literal["sample", "fixed", "none"] = "sample"
    """``sample``: each channel of each tile to zero mean and unit std; ``fixed``: (x - mean) / std with
    ``--data.mean``/``--data.std``; ``none``: raw values."""
    mean: tuple[float, ...] | None = None
    """Per-channel means for ``--data.normalize fixed`` (one value: every channel)."""
    std: tuple[float, ...] | None = None
    """Per-channel standard deviations for ``--data.normalize fixed`` (one value: every channel)."""
    tile: tuple[int, ...] | None = None
    """Tile size per axis; it is the model's input size (None: whole images resized to ``--arch.img-size``
    for ``imagefolder``, tiles of ``--arch.img-size`` for volumes and arrays)."""
    tile_overlap: float = 0.0
    """Fraction of a tile shared with its neighbour along each axis (step = tile - round(overlap * tile))."""
    use_all_data: bool = False
    """Add a last tile per axis that ends at the border, so no pixel is left out."""
    slice_axis: int | None = None
    """Train a 2D model on slices of 3D volumes along this axis (0, 1 or 2)."""
    resize: Literal["resize", "crop"] = "resize"
    """``imagefolder`` without ``--data.tile``: resize each image to the model's size (antialiased), or
    resize its short side and crop the centre."""
    pad_value: float | None = None
    """Pad images/volumes smaller than a tile with this value (None: such a file is an error)."""
    split: tuple[float, float] = (0.0, 1.0)
    """Fractions [start, end) of each directory's files that this run reads (e.g. 0 0.8 for training)."""


@dataclass
class DataConfig(DatasetConfig):
    """Input data. ``synthetic`` needs no files: images/volumes are generated from (seed, sample index)."""

    num_classes: int = 3
    """Classes of the synthetic data (image labels and masks; class 0 is the background)."""
    global_batch_size: int = 16
    """Samples per optimizer step over all data-parallel ranks and micro-batches."""
    micro_batch_size: int | None = None
    """Samples per rank per forward; fewer than the rank's share means gradient accumulation (None: no accumulation)."""
    shuffle: bool = True
    """Visit the samples of each epoch in an order drawn from (seed, dataset, epoch)."""
    num_workers: int = 0
    """Loader worker processes per rank (0: load in the training process)."""
    prefetch_factor: int = 2
    """Micro-batches each worker prepares ahead."""
    skip_bad_files: bool = False
    """Log a corrupt file with its path and skip it, instead of stopping."""
    patching: Literal["tree", "grid"] = "tree"
    """Models built with ``adaptive_patching``: quadtree (2D) / octree (3D) patches of ``--arch.fixed-length``
    regions split where the image has edges, or the regular grid."""
    min_patch: int | None = None
    """Smallest region side of the adaptive patching (None: the model's patch size)."""
    edge_thresholds: tuple[float, float] = (50.0, 150.0)
    """Canny thresholds of the 2D adaptive patching, on images scaled to 0..255."""
    separate_channels: bool = False
    """Give each channel its own quadtree/octree (adaptive patching of a ``--arch.single-channel`` model,
    which trains on one channel at a time); otherwise one tree from the edges of all channels."""
    datasets: Annotated[dict[str, DatasetConfig], tyro.conf.Suppress] = field(default_factory=dict)
    """Several datasets by name (from a ``--config`` file); the top-level dataset options are then unused."""
    groups: tuple[int, ...] | None = None
    """Data-parallel ranks per dataset of ``datasets``, in order (None: in proportion to their tile counts)."""
