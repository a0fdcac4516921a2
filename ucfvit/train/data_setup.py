"""The trainer's side of the data seam: checks of the data options, the index built once, the plan.

* :func:`check_data` runs in ``validate_config`` on every rank before any collective: it reads the
  options and looks at most at the dataset roots (exists, is a directory), never at every file.
* :func:`prepare_data` runs after the mesh exists: rank 0 builds the file/tile index (or reuses
  ``<run.dir>/data/index.json``), every rank learns whether that worked (one broadcast, so a bad
  file stops every rank with the same error), the other ranks read the file, and the load plan
  is saved as ``<run.dir>/data/plan.json``.
* :func:`defer_to_data` (command line: no file opened) leaves to the data the model options it
  decides (input size from ``--data.tile``, channels and classes from the files) where no flag or
  config file set them; :func:`adapt_to_data` (validation) fills them from the data.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from torch import nn

from ucfvit.data.balance import LoadPlan, plan_load
from ucfvit.data.config import DataConfig
from ucfvit.data.dataset import InputSpec, Source, build_dataset, dataset_configs, is_file_kind
from ucfvit.data.index import SourceIndex, build_index, fingerprint, load_index, save_index
from ucfvit.data.loader import TreePatches
from ucfvit.data.readers import DataError, Item, get_reader
from ucfvit.models import FamilySpec

from .atomic import write_atomic

__all__ = [
    "DataSetup",
    "adapt_to_data",
    "channel_batches",
    "check_data",
    "check_run_dir_outside_data",
    "defer_to_data",
    "index_on_rank0",
    "input_spec",
    "prepare_data",
    "tree_transform",
]

INDEX_FILE, PLAN_FILE = Path("data") / "index.json", Path("data") / "plan.json"


def input_spec(model: nn.Module, spec: FamilySpec) -> InputSpec:
    """What ``model`` takes, for the data pipeline: a ``single_channel`` model reads samples with all
    its variables as channels and trains on them one at a time (:func:`channel_batches`)."""
    return InputSpec(
        img_size=tuple(model.img_size),
        channels=len(model.variables) if getattr(model, "single_channel", False) else model.data_chans,
        variables=tuple(model.variables),
        num_classes=getattr(model, "num_classes", None),
        needs=spec.needs,
    )


def check_data(data: DataConfig, model: nn.Module, spec: FamilySpec, dp_size: int) -> None:
    """Every data check that needs neither files nor communication (ValueError naming the option)."""
    configs = dataset_configs(data)
    if data.datasets:
        top = DataConfig()
        changed = [f for f in ("kind", "root", "labels", "tile", "variables") if getattr(data, f) != getattr(top, f)]
        if changed:
            raise ValueError(
                f"data.datasets names {len(data.datasets)} dataset(s), so the top-level --data.{changed[0]} is unused; "
                "set it inside each dataset of the --config file"
            )
    elif data.groups is not None:
        raise ValueError("--data.groups gives ranks per dataset of data.datasets (a --config file); this run has one")
    img_size = tuple(model.img_size)
    for name, c in configs.items():
        where = f"dataset {name!r}: " if data.datasets else ""
        if not is_file_kind(c.kind):
            continue
        if c.root is None:
            raise ValueError(f"{where}--data.kind {c.kind} reads files: give their directory with --data.root DIR")
        for option, path in (("--data.root", c.root), ("--data.labels", c.labels)):
            if path is not None and not Path(path).is_dir():
                raise ValueError(f"{where}{option} {path} is not a directory")
        if c.tile is not None:
            expect = len(img_size) + (c.slice_axis is not None)
            if len(c.tile) != len(img_size) or tuple(c.tile) != img_size:
                raise ValueError(
                    f"{where}--data.tile {' '.join(map(str, c.tile))} must equal the model's input size "
                    f"--arch.img-size {' '.join(map(str, img_size))} ({len(img_size)} entries; the tile is what the "
                    f"model sees{', a slice has ' + str(expect - 1) + ' axes' if c.slice_axis is not None else ''})"
                )
        if c.slice_axis is not None and (c.slice_axis not in (0, 1, 2) or len(img_size) != 2):
            raise ValueError(f"{where}--data.slice-axis {c.slice_axis} must be 0, 1 or 2, for a 2D model")
        if not 0 <= c.split[0] < c.split[1] <= 1:
            raise ValueError(f"{where}--data.split {c.split[0]} {c.split[1]} must be fractions 0 <= start < end <= 1")
        if c.normalize == "fixed" and (c.mean is None or c.std is None):
            raise ValueError(f"{where}--data.normalize fixed needs --data.mean and --data.std (one value per channel)")
        missing = [n for n in spec.needs if not _provides(c, n)]
        if missing:
            how = {
                "seg": "per-pixel labels: pass --data.labels DIR",
                "label": "class labels: use --data.kind imagefolder with one sub-folder per class",
            }
            raise ValueError(f"{where}--model {spec.name} trains on {how[missing[0]]}")
    tree = getattr(model, "adaptive_patching", False) and data.patching == "tree"
    if tree:
        _check_tree(data, model)
    if data.separate_channels and not (tree and getattr(model, "single_channel", False)):
        raise ValueError(
            "--data.separate-channels gives each channel its own quadtree/octree, so the model must train on one "
            "channel at a time from adaptive patches: add --arch.single-channel True and --arch.adaptive-patching "
            "True (with --data.patching tree), or drop --data.separate-channels"
        )


def check_run_dir_outside_data(data: DataConfig, run_dir: Path) -> None:
    """Refuse (ValueError naming both) a run directory inside the root of a dataset whose reader reads
    PNG files: the run's pictures and curves would become data (a class folder) of the next run."""
    run = Path(os.path.abspath(run_dir))
    for name, c in dataset_configs(data).items():
        if not is_file_kind(c.kind) or c.root is None or ".png" not in get_reader(c.kind).suffixes:
            continue
        root = Path(os.path.abspath(c.root))
        if run == root or root in run.parents:
            where = f"dataset {name!r}: " if data.datasets else ""
            raise ValueError(
                f"{where}--run.dir {run} lies inside --data.root {root}: the run's pictures would be read as "
                "images (a class of their own) by the next run; choose a --run.dir outside the data"
            )


def _provides(cfg, entry: str) -> bool:
    if entry == "seg":
        return cfg.labels is not None
    return hasattr(get_reader(cfg.kind), "classes")


def _check_tree(data: DataConfig, model: nn.Module) -> None:
    if model.fixed_length is None:
        raise ValueError(
            f"--data.patching tree cuts each image into --arch.fixed-length regions: set it (e.g. "
            f"--arch.fixed-length {max(1, math.prod(s // model.patch_size for s in model.img_size) // 4)}), or use "
            "--data.patching grid"
        )
    side = data.min_patch or model.patch_size
    if any(s % side for s in model.img_size):
        raise ValueError(
            f"--data.min-patch {side} must divide the input size --arch.img-size {' '.join(map(str, model.img_size))}"
        )


def channel_batches(batch: dict, variables: Sequence[str], separate_trees: bool) -> list[dict]:
    """A batch of a ``single_channel`` model split into one batch per channel, each naming its variable
    (``batch["variables"]``, which the family losses pass to the model). Patch sequences are split
    along their channel axis: (B, L, C, ..) from one shared tree, or (B, C, L, ..) from one tree per
    channel (``--data.separate-channels``). Labels and masks are shared by every channel."""
    trees = ("patches", "coords", "sizes", "valid")
    out = []
    for c, name in enumerate(variables):
        sub = {**batch, "image": batch["image"][:, c : c + 1], "variables": (name,)}
        if "patches" in batch:
            if separate_trees:
                sub.update({k: batch[k][:, c] for k in trees if k in batch})
            else:
                sub["patches"] = batch["patches"][:, :, c : c + 1]
        out.append(sub)
    return out


@dataclass
class DataSetup:
    """The run's sources, their load plan, and where each dataset's stream starts."""

    sources: list[Source]
    plan: LoadPlan


def index_on_rank0(
    data: DataConfig, img_size, run_dir: Path, rank: int, where: Path = INDEX_FILE
) -> dict[str, SourceIndex]:
    """The file index of ``data``'s file datasets: rank 0 builds (or reuses) ``run_dir/where`` and
    writes it; every rank then reads it. A failure on rank 0 is raised on every rank (the broadcast
    doubles as the barrier). Collective when there are file datasets."""
    files = {n: c for n, c in dataset_configs(data).items() if is_file_kind(c.kind)}
    if not files:
        return {}
    key = fingerprint(files, img_size, data.skip_bad_files)
    path = run_dir / where
    error, indexes = None, None
    if rank == 0:
        try:
            indexes = load_index(path, key)
            if indexes is None:
                indexes = {
                    n: build_index(
                        n, c, get_reader(c.kind)(spatial_ndim=_file_ndim(c, img_size)), img_size, data.skip_bad_files
                    )
                    for n, c in files.items()
                }
                save_index(path, key, indexes)
                for index in indexes.values():
                    index.saved_as = str(path)
                samples, count = sum(map(len, indexes.values())), sum(len(i.entries) for i in indexes.values())
                print(f"data index: {samples} samples from {count} files, saved to {path}", flush=True)
        except DataError as err:
            error = str(err)
        except OSError as err:
            error = f"rank 0 could not build the data index {path}: {err}"
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise DataError(box[0])
    if rank != 0:
        indexes = load_index(path, key)
    if indexes is None:
        raise DataError(f"{path}: the data index written by rank 0 cannot be read on rank {rank}")
    return indexes


def _file_ndim(cfg, img_size) -> int:
    return 3 if cfg.slice_axis is not None else len(img_size)


def prepare_data(data: DataConfig, spec: InputSpec, dp_size: int, seed: int, run_dir: Path, rank: int) -> DataSetup:
    """Index, sources and load plan of the run (collective: every rank calls it)."""
    indexes = index_on_rank0(data, spec.img_size, run_dir, rank)
    sources = build_dataset(data, spec, seed, indexes)
    plan = plan_load(
        list(sources), [s.size for s in sources.values()], dp_size, data.global_batch_size // dp_size, data.groups
    )
    if rank == 0:
        (run_dir / PLAN_FILE).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / PLAN_FILE, json.dumps(plan.to_dict(), indent=2))
    return DataSetup(list(sources.values()), plan)


# --------------------------------------------------------------------------- options the data decides
def _data_decides(cfg) -> dict[str, bool]:
    """Which model options the data of ``cfg`` decides (a single file dataset): the input size from
    ``--data.tile``, the channels from the files (unless ``--data.variables`` picks them), the
    classes from an image folder's class sub-folders (unless ``--data.labels`` gives masks)."""
    data = cfg.data
    if data.datasets or not is_file_kind(data.kind) or data.root is None:
        return {}  # several datasets: their model options are set in the config file
    reader = get_reader(data.kind)
    return {
        "img_size": data.tile is not None,
        "in_chans": data.variables is None,
        "num_classes": hasattr(reader, "classes") and data.labels is None,
    }


def defer_to_data(cfg, explicit: set[str]) -> None:
    """Leave to the data (None) the model options it decides that ``explicit`` (the dotted options
    a command line or config file set) does not: :func:`adapt_to_data` fills them when the run is
    validated. Opens no file."""
    for name, decided in _data_decides(cfg).items():
        if decided and f"arch.{name}" not in explicit:
            setattr(cfg.arch, name, None)


def adapt_to_data(cfg) -> None:
    """Fill the model options :func:`defer_to_data` left to the data: ``--arch.img-size`` from
    ``--data.tile``, ``--arch.in-chans`` from the first file's header, ``--arch.num-classes`` from
    the class sub-folders. An option the data cannot tell (no readable file yet) stays None, the
    family's default; the index build then names the file."""
    decides = _data_decides(cfg)
    if not decides or not Path(cfg.data.root).is_dir():
        return  # a bad root is refused by check_data
    data, arch = cfg.data, cfg.arch
    if decides["img_size"] and arch.img_size is None:
        arch.img_size = tuple(data.tile)
    reader = get_reader(data.kind)
    if decides["in_chans"] and arch.in_chans is None:
        first = _first_file(Path(data.root), reader.suffixes)
        if first is not None:
            try:
                file_ndim = 3 if data.slice_axis is not None else len(arch.img_size or (0, 0))
                arch.in_chans, _ = reader(spatial_ndim=file_ndim).header(Item(first))
            except (DataError, ValueError):
                pass  # the index build names the file
    if decides["num_classes"] and arch.num_classes is None:
        try:
            classes = reader().classes(Path(data.root))
        except (DataError, ValueError, OSError):
            classes = []
        if classes:
            arch.num_classes = len(classes)


def tree_transform(model: nn.Module, data: DataConfig) -> TreePatches | None:
    """The quadtree/octree transform that cuts ``model``'s adaptive patches from each sample
    (``--data.patching tree``; one tree per channel with ``--data.separate-channels``), or None."""
    if not (getattr(model, "adaptive_patching", False) and data.patching == "tree"):
        return None
    return TreePatches(
        model.patch_size, model.fixed_length, data.min_patch, data.edge_thresholds, data.separate_channels
    )


def _first_file(root: Path, suffixes) -> str | None:
    """The first data file under ``root`` in name order, listing as few directories as possible (a FIFO
    or other non-regular file is passed over: the index build names it)."""
    for top, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(top) / name
            if not name.startswith(".") and name.lower().endswith(tuple(suffixes)) and path.is_file():
                return str(path)
    return None
