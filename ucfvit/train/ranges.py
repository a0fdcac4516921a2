"""The allowed range of every numeric training option, checked before anything is built.

:data:`RANGES` maps each numeric field of :class:`~ucfvit.train.config.Config` (dotted path, the
``--arch.*`` model options included) to a :class:`Range`; :func:`check_ranges` checks a config
against it and raises one :class:`~ucfvit.train.config.ConfigError` naming the command-line flag,
the value and the range. It runs first in ``validate_config``, so a value that would later divide
by zero, overflow, or trip an assertion deep inside FSDP is refused with a one-line message, before
the model is built or the run directory is touched. A new numeric training option needs an entry in
:data:`TRAINING_RANGES`; a new numeric model option declares its range next to its constructor
(:mod:`ucfvit.models.ranges`). ``tests/unit/test_validate.py`` fails while an option has no range.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator
from typing import Any

from ucfvit.models import FAMILIES
from ucfvit.models.ranges import AT_LEAST_0, AT_LEAST_1, FRACTION, POSITIVE, Range, option_ranges

from .config import Config, ConfigError, DatasetConfig
from .optim import peak_lr

__all__ = ["RANGES", "Range", "check_ranges", "flag", "numeric_fields"]


TRAINING_RANGES: dict[str, Range] = {
    # Forward noise is keyed by the step modulo 2**32: more steps would repeat it.
    "max_steps": Range(1, 2**32),
    # The synthetic data draws shapes of classes 1..n-1 on a background class 0.
    "data.num_classes": Range(2),
    # SampleRNG keys a step's samples by a 32-bit index.
    "data.global_batch_size": Range(1, 2**32),
    "data.micro_batch_size": AT_LEAST_1,
    "data.tile": AT_LEAST_1,  # per entry
    "data.tile_overlap": Range(0, 1, high_open=True),  # a tile must advance: overlap 1 would never move
    "data.slice_axis": Range(0, 2),
    "data.pad_value": Range(),  # any finite value
    "data.split": Range(0, 1),  # per entry; start < end is checked with the data options
    "data.mean": Range(),
    "data.std": POSITIVE,
    "data.num_workers": AT_LEAST_0,
    "data.prefetch_factor": AT_LEAST_1,
    "data.min_patch": AT_LEAST_1,
    "data.edge_thresholds": AT_LEAST_0,
    "data.groups": AT_LEAST_1,
    "optim.lr": POSITIVE,
    "optim.weight_decay": AT_LEAST_0,
    "optim.betas": FRACTION,  # AdamW's own range, per entry
    "optim.eps": POSITIVE,
    "optim.grad_clip": AT_LEAST_0,  # 0: no clipping
    "optim.skip_nonfinite": AT_LEAST_0,  # 0: stop at the first non-finite step
    "optim.layer_decay": Range(0, 1, low_open=True),  # 1: off
    "schedule.warmup_steps": AT_LEAST_0,
    "schedule.warmup_start_lr": AT_LEAST_0,
    "schedule.min_lr": AT_LEAST_0,  # and at most the peak lr, checked below
    "checkpoint.every": AT_LEAST_0,  # 0: only at the end
    "checkpoint.keep": AT_LEAST_1,
    "metrics.log_every": AT_LEAST_1,
    "eval.every": AT_LEAST_0,  # 0: no validation during training
    "eval.samples": AT_LEAST_1,
    "eval.batch_size": AT_LEAST_1,
    "eval.split": Range(0, 1),  # per entry; start < end is checked with the data options
    "eval.image_size": AT_LEAST_1,  # per entry; at least the model's input, checked with the data options
    "eval.pictures": AT_LEAST_0,
    "eval.sample_steps": AT_LEAST_1,  # at most --arch.time-steps, checked with the data options
    "eval.window_overlap": Range(0, 1, high_open=True),
    # torch.manual_seed takes [-2**63, 2**64 - 1] and the Philox key is the seed modulo 2**64:
    # non-negative seeds below 2**64 are the ones that give distinct runs.
    "run.seed": Range(0, 2**64 - 1),
    "run.collective_timeout": POSITIVE,  # seconds; finite, as every float here
}


def _arch_ranges() -> dict[str, Range]:
    """``arch.<option>`` -> the range its constructor declares (see :mod:`ucfvit.models.ranges`); an
    option that several families take must have one range."""
    out: dict[str, Range] = {}
    for spec in FAMILIES.values():
        for name, allowed in option_ranges(spec.model).items():
            if out.setdefault(f"arch.{name}", allowed) != allowed:
                raise ValueError(
                    f"{spec.model.__name__} declares the range of {name} as {allowed}, others as "
                    f"{out['arch.' + name]}: an option has one range"
                )
    return out


RANGES: dict[str, Range] = {**TRAINING_RANGES, **_arch_ranges()}
"""Every numeric option's range, dotted path -> Range (``--arch.*``: None is the family's default, not checked)."""


def flag(path: str) -> str:
    """The command-line flag of dotted field ``path`` (``optim.grad_clip`` -> ``--optim.grad-clip``)."""
    return "--" + path.replace("_", "-")


def _numeric_kind(annotation: Any) -> tuple[type, bool] | None:
    """``(int or float, is_tuple)`` for a numeric field type (Optional and tuples included), else None."""
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    members = tuple(m for m in members if m is not type(None)) or (annotation,)
    if len(members) != 1:
        return None
    kind = members[0]
    is_tuple = typing.get_origin(kind) is tuple
    if is_tuple:
        items = {a for a in typing.get_args(kind) if a is not Ellipsis}
        kind = items.pop() if len(items) == 1 else None
    return (kind, is_tuple) if kind in (int, float) else None


def numeric_fields(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, type, bool]]:
    """``(dotted path, int or float, is_tuple)`` of every numeric field of ``cls``, nested groups included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from numeric_fields(kind, f"{prefix}{f.name}.")
        elif (numeric := _numeric_kind(kind)) is not None:
            yield (f"{prefix}{f.name}", *numeric)


def _get(cfg: Config, path: str) -> Any:
    value = cfg
    for name in path.split("."):
        value = getattr(value, name)
    return value


def _checks(cfg: Config) -> Iterator[tuple[str, str, Any, type, bool]]:
    """``(RANGES path, name to show, value, kind, is_tuple)`` of every numeric option set in ``cfg``,
    the options of each dataset of ``data.datasets`` (a config file) included."""
    for path, kind, is_tuple in numeric_fields(type(cfg)):
        yield path, flag(path), _get(cfg, path), kind, is_tuple
    dataset_fields = {f.name for f in dataclasses.fields(DatasetConfig)}
    for name, dataset in cfg.data.datasets.items():
        for path, kind, is_tuple in numeric_fields(type(cfg)):
            group, _, field_name = path.partition(".")
            if group == "data" and field_name in dataset_fields:
                yield path, f"data.datasets.{name}.{field_name}", getattr(dataset, field_name), kind, is_tuple


def check_ranges(cfg: Config) -> None:
    """Raise a :class:`ConfigError` for the first numeric option of ``cfg`` outside its range
    (see :data:`RANGES`), or for ``--schedule.min-lr`` above the peak learning rate."""
    for path, shown, value, kind, is_tuple in _checks(cfg):
        if value is None:
            continue
        allowed = RANGES[path]
        what = f"{'an integer' if kind is int else 'a finite number'} {_phrase(allowed)}"
        if is_tuple and not all(v in allowed for v in value):
            raise ConfigError(f"{shown}={value} is out of range: each entry must be {what}")
        if not is_tuple and value not in allowed:
            raise ConfigError(f"{shown}={value} is out of range: it must be {what}")
    peak = peak_lr(cfg)
    if cfg.schedule.min_lr > peak:
        scaled = " (x global batch / 256 with --optim.lr-scaling linear)" if cfg.optim.lr_scaling == "linear" else ""
        raise ConfigError(
            f"--schedule.min-lr={cfg.schedule.min_lr} is above the peak learning rate {peak:g} "
            f"(--optim.lr={cfg.optim.lr}{scaled}): it must be at most {peak:g}"
        )


def _phrase(allowed: Range) -> str:
    text = str(allowed)
    return f"in {text}" if text[0] in "[(" else text
