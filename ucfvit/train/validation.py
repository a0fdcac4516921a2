"""Validation: held-out samples sharded over the data-parallel ranks, reduced exactly, and pictures.

The family's :class:`~ucfvit.models.tasks.Task` turns each batch into per-sample values; each rank
sums the rows of its own samples, the sums are all-reduced over the ``ddp`` and ``fsdp`` mesh
dimensions (tensor-parallel ranks hold the same samples and are not counted twice), and the task
divides. The samples are fixed (the first ``--eval.samples`` of each dataset, evenly spread over a
file dataset) and their randomness (MAE masks, diffusion noise) is keyed by (seed, sample index),
so validation gives the same figures on any mesh and at any step of the run.

Every rank runs the same number of forwards on batches of one size: a rank whose share ends
early pads its batch with samples it does not count, so collectives inside the model (FSDP
gathers, tensor-parallel reductions) stay matched.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ucfvit.data.config import DataConfig, DatasetConfig
from ucfvit.data.dataset import InputSpec, Source, build_dataset, dataset_configs, is_file_kind
from ucfvit.data.loader import TreePatches
from ucfvit.eval.pictures import draw_panels, save_png
from ucfvit.models import FamilySpec
from ucfvit.models.rng import SampleRNG
from ucfvit.models.tasks import EvalOptions
from ucfvit.parallel import data_parallel_info

from .config import Config, EvalConfig
from .data_setup import channel_batches, index_on_rank0

__all__ = ["EVAL_STEP", "Validator", "check_eval", "eval_split"]

EVAL_STEP = 2**32 - 1
"""The step word of evaluation randomness (training steps stay below it: ``max_steps`` < 2**32)."""
SYNTHETIC_OFFSET = 1 << 40
"""Synthetic validation sample k is generator sample ``SYNTHETIC_OFFSET + k``: never drawn in training."""
EVAL_INDEX_FILE = Path("data") / "eval_index.json"


def eval_split(dataset: DatasetConfig, cfg: EvalConfig) -> tuple[float, float]:
    """The file fractions a dataset validates on: ``--eval.split``, else what ``--data.split`` leaves.
    Raises ValueError when training reads every file and no ``--eval.split`` is given."""
    if cfg.split is not None:
        return tuple(cfg.split)
    start, end = dataset.split
    if end < 1:
        return (end, 1.0)
    if start > 0:
        return (0.0, start)
    raise ValueError(
        "validation needs files that training does not read: train on part of them (e.g. --data.split 0 0.9, "
        "leaving the last 10% of each directory's files to validation) or name the validation files with "
        "--eval.split START END"
    )


def check_eval(cfg: Config, model: nn.Module, spec: FamilySpec, evaluating: bool = False) -> None:
    """The validation options against the model and the data (no file read, no collective);
    ``evaluating``: checked for ``recipes/evaluate.py`` even without ``--eval.every``."""
    ev = cfg.eval
    if not (evaluating or ev.every > 0):
        return
    if spec.evaluation is None:
        raise ValueError(f"--model {spec.name} defines no evaluation (its FamilySpec has evaluation=None)")
    if ev.split is not None and not 0 <= ev.split[0] < ev.split[1] <= 1:
        raise ValueError(f"--eval.split {ev.split[0]} {ev.split[1]} must be fractions 0 <= start < end <= 1")
    for name, dataset in dataset_configs(cfg.data).items():
        if is_file_kind(dataset.kind):
            try:
                eval_split(dataset, ev)
            except ValueError as err:
                raise ValueError(f"dataset {name!r}: {err}" if cfg.data.datasets else str(err)) from None
    if ev.image_size is not None:
        img = tuple(model.img_size)
        if any(is_file_kind(d.kind) for d in dataset_configs(cfg.data).values()):
            raise ValueError("--eval.image-size sizes the synthetic validation images; file data keeps its tiles")
        if not getattr(spec.evaluation, "larger_inputs", False):
            raise ValueError(f"--eval.image-size: --model {spec.name} evaluates inputs of its own size only")
        if len(ev.image_size) != len(img) or any(s < i for s, i in zip(ev.image_size, img, strict=True)):
            raise ValueError(
                f"--eval.image-size {' '.join(map(str, ev.image_size))} must have {len(img)} entries, each at least "
                f"the model's input --arch.img-size {' '.join(map(str, img))}"
            )
    steps = getattr(model, "time_steps", None)
    if steps is not None and ev.sampler == "ddim" and ev.sample_steps > steps:
        raise ValueError(f"--eval.sample-steps {ev.sample_steps} must be at most --arch.time-steps {steps}")


class _Shifted(Source):
    """Samples ``offset + k`` of a source, ``size`` of them."""

    def __init__(self, base: Source, offset: int, size: int):
        self.name, self.size, self.base, self.offset = base.name, size, base, offset

    def sample(self, k: int) -> dict[str, torch.Tensor]:
        return self.base.sample(self.offset + k)


def _eval_data(cfg: Config) -> DataConfig:
    """``cfg.data`` with every file dataset reading its validation split."""

    def split(d: DatasetConfig) -> DatasetConfig:
        return dataclasses.replace(d, split=eval_split(d, cfg.eval)) if is_file_kind(d.kind) else d

    data = split(cfg.data)
    return dataclasses.replace(data, datasets={n: split(d) for n, d in cfg.data.datasets.items()})


def _collate(samples: list[Mapping[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    common = set.intersection(*(set(s) for s in samples))
    return {k: torch.stack([s[k] for s in samples]).to(device) for k in sorted(common)}


class Validator:
    """Validation of ``model`` (parallelized over ``mesh``) on ``cfg``'s held-out data.

    ``tree``: the adaptive-patch transform training uses (the run plan's), applied per sample here.
    Building it is collective when file datasets need their index (rank 0 builds it into
    ``<run_dir>/data/eval_index.json``); :meth:`run` and :meth:`pictures` are collective.
    """

    def __init__(
        self,
        model: nn.Module,
        family: FamilySpec,
        spec: InputSpec,
        mesh: DeviceMesh,
        cfg: Config,
        run_dir: Path,
        extra: Any = None,
        tree: TreePatches | None = None,
    ):
        self.model, self.family, self.mesh, self.cfg, self.extra = model, family, mesh, cfg, extra
        self.task = family.evaluation
        ev = cfg.eval
        self.options = EvalOptions(ev.sampler, ev.sample_steps, ev.window_overlap, ev.window_weights)
        data = _eval_data(cfg)
        size = tuple(ev.image_size) if ev.image_size is not None else spec.img_size
        spec = dataclasses.replace(spec, img_size=size)
        rank = dist.get_rank()
        indexes = index_on_rank0(data, spec.img_size, run_dir, rank, EVAL_INDEX_FILE)
        self.sources = [
            s if s.size is not None else _Shifted(s, SYNTHETIC_OFFSET, ev.samples)
            for s in build_dataset(data, spec, cfg.run.seed, indexes).values()
        ]
        self.keys = [
            (d, k * s.size // n)
            for d, s in enumerate(self.sources)
            for n in [min(ev.samples, s.size)]
            for k in range(n)
        ]
        self.tree = tree
        # A tile reaches the model one channel at a time under --data.separate-channels: one tree each.
        self.tile_tree = tree if tree is None or not tree.separate_channels else tree.shared()
        self.device = next(model.parameters()).device

    def _inputs(self, batch: Mapping[str, Any]) -> tuple:
        """The family's forward arguments; the adaptive patches of a sliding-window tile are cut here."""
        if self.tile_tree is not None and "patches" not in batch:
            trees = [self.tile_tree({"image": image}) for image in batch["image"].detach().cpu()]
            batch = {**batch, **_collate([{k: v for k, v in t.items() if k != "image"} for t in trees], self.device)}
        return self.family.inputs(self.model, batch)

    def _parts(self, batch: dict[str, torch.Tensor]) -> list[dict]:
        """A single-channel model sees one channel at a time (with its own tree under
        ``--data.separate-channels``), as in training."""
        if getattr(self.model, "single_channel", False):
            separate = self.tree is not None and self.tree.separate_channels
            return channel_batches(batch, self.model.variables, separate)
        return [batch]

    def _batch(self, rows: range) -> dict[str, torch.Tensor]:
        """The samples of ``rows``; at the model's input size their trees are cut here, per whole
        sample, as the training loader cuts them (larger sliding-window images: per tile, later)."""
        keys = [self.keys[min(g, len(self.keys) - 1)] for g in rows]
        samples = [self.sources[d].sample(k) for d, k in keys]
        if self.tree is not None and self.cfg.eval.image_size is None:
            samples = [self.tree(s) for s in samples]
        return _collate(samples, self.device)

    @torch.no_grad()
    def run(self) -> dict[str, Any]:
        """Metrics of the task over every validation sample (the same on every rank). Collective."""
        dp_rank, dp_size = data_parallel_info(self.mesh)
        total = len(self.keys)
        share = math.ceil(total / dp_size)
        size = min(self.cfg.eval.batch_size, share)
        mine = range(dp_rank * share, min(total, (dp_rank + 1) * share))
        bound = dp_size * share + size  # SampleRNG's check: every padded row stays below it
        was_training = self.model.training
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}
        count = 0
        try:
            for i in range(math.ceil(share / size)):
                rows = range(dp_rank * share + i * size, dp_rank * share + (i + 1) * size)
                counted = [g in mine for g in rows]
                weight = torch.tensor(counted, dtype=torch.float64, device=self.device)
                for p, part in enumerate(self._parts(self._batch(rows))):
                    rng = SampleRNG(self.cfg.run.seed, EVAL_STEP - p, rows.start, bound)
                    values = self.task.evaluate(self.model, part, self._inputs, rng, self.extra, self.options)
                    for name, v in values.items():
                        v = (v.double() * weight.view(-1, *([1] * (v.ndim - 1)))).sum(0)
                        sums[name] = sums[name] + v if name in sums else v
                    count += sum(counted)
        finally:
            self.model.train(was_training)
        names = sorted(sums)
        flat = torch.cat([sums[n].flatten() for n in names] + [torch.tensor([float(count)], device=self.device)])
        for dim in ("ddp", "fsdp"):
            if self.mesh[dim].size() > 1:
                dist.all_reduce(flat, group=self.mesh[dim].get_group())
        totals, offset = {}, 0
        for n in names:
            totals[n] = flat[offset : offset + sums[n].numel()].view(sums[n].shape).cpu()
            offset += sums[n].numel()
        samples = int(flat[-1].item())
        return {**self.task.summarize(totals, samples), "samples": samples}

    @torch.no_grad()
    def pictures(self, out_dir: Path, name: str) -> Path | None:
        """Draw the task's picture of the first ``--eval.pictures`` validation samples into
        ``out_dir/<name>.png`` (rank 0 writes; every rank runs the forward). Collective."""
        count = min(self.cfg.eval.pictures, len(self.keys))
        if count == 0:
            return None
        was_training = self.model.training
        self.model.eval()
        try:
            batch = self._parts(self._batch(range(count)))[0]
            rng = SampleRNG(self.cfg.run.seed, EVAL_STEP, 0, count)
            panels = self.task.pictures(self.model, batch, self._inputs, rng, self.extra, self.options)
        finally:
            self.model.train(was_training)
        if not panels or dist.get_rank() != 0:
            return None
        return save_png(Path(out_dir) / f"{name}.png", draw_panels(panels, rows=count))
