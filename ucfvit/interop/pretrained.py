"""Initialise a model from pretrained weights in ucfvit names, reporting what was used.

For fine-tuning: an MAE's encoder into a ViT, UNETR or SAP, a classifier's backbone under a new
head, a checkpoint of another image size. Entries are matched by name; a learned position table
of another grid is resized (bi/trilinear) to the model's; a convolutional patch embedding
(D, C, *p) becomes the linear one of an adaptive model (D, C * p**ndim), the same map. Anything
else that does not fit is skipped with its reason, never loaded half-way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..models.embed import resize_pos_embed
from .common import WeightsError, is_sincos_table

__all__ = ["LoadReport", "check_weights", "fit_pretrained", "load_pretrained"]

_TABLES = ("pos_embed", "decoder_pos_embed")


@dataclass
class LoadReport:
    """What :func:`fit_pretrained` chose: ``loaded`` and ``fresh`` (the model's entries that keep
    their initialisation) are model names; ``skipped`` maps a checkpoint entry to the reason."""

    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for the log: counts, then every skipped and fresh entry."""
        lines = [f"loaded {len(self.loaded)} tensors, skipped {len(self.skipped)}, fresh {len(self.fresh)}"]
        lines += [f"  skipped {k}: {why}" for k, why in self.skipped.items()]
        lines += [f"  fresh {k}" for k in self.fresh]
        return "\n".join(lines)


def _fit(model: torch.nn.Module, key: str, value: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor | None, str]:
    """``value`` shaped for a model entry of (global) ``shape``, or None and why not."""
    if value.shape == shape:
        return value, ""
    if key in _TABLES and value.ndim == 3 and len(shape) == 3 and value.shape[::2] == shape[::2]:
        return resize_pos_embed(value, model.checkpoint_grid(value.shape[1]), model.grid), ""
    if key.endswith("patch_embed.proj.weight") and len(shape) == 2 and value.flatten(1).shape == shape:
        return value.flatten(1), ""  # a conv kernel over (C, *p) is the linear map of the flattened patch
    return None, f"shape {tuple(value.shape)} does not fit the model's {tuple(shape)}"


def _unused_table(key: str, value: torch.Tensor, model: torch.nn.Module) -> str:
    """Why a position table the model has no parameter for is skipped."""
    if getattr(model, key, None) is None:
        return "the model has no position table (pos_embed='none', rope or adaptive positions)"
    if is_sincos_table(value, model.ndim):
        return "the fixed sin-cos table, which the model computes itself"
    return (
        "a trained table, but the model's positions are the fixed sin-cos table: build it with "
        "pos_embed='learned' to use it"
    )


def check_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse (:class:`WeightsError` naming ``where`` and the tensor) an entry of ``state`` that the
    model has but that would load wrongly: a floating-point entry stored as integers (or the other
    way round), or one holding NaN or infinity (a run from it would be blamed on the learning rate)."""
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, tensor in state.items():
        mine = own.get(name)
        if mine is None or not isinstance(tensor, torch.Tensor):
            continue
        if mine.is_floating_point() != tensor.is_floating_point():
            raise WeightsError(
                f"{where}: tensor {name} is stored as {tensor.dtype}, but the model's {name} is {mine.dtype}; "
                "a floating-point tensor must be stored as floating point (and an integer one as integer)"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise WeightsError(
                f"{where}: tensor {name} holds {bad} non-finite value(s) (NaN or infinity), which no model can "
                "start from or be scored with; use other weights (e.g. an earlier checkpoint of that run)"
            )


def fit_pretrained(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...] | None = None
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The entries of ``state`` (ucfvit names) that fit ``model``, shaped for it, and the report;
    only names starting with one of ``prefixes`` when given (e.g. ``ENCODER_PREFIXES``). Works on a
    parallelized model too (shapes are global); load the result as a full state dict."""
    own = {k: v.shape for k, v in model.state_dict().items()}
    report, accepted = LoadReport(), {}
    for key, value in state.items():
        if prefixes is not None and not key.startswith(prefixes):
            report.skipped[key] = "not among the parts to initialise"
        elif key not in own:
            why = _unused_table(key, value, model) if key in _TABLES else "the model has no such entry"
            report.skipped[key] = why
        else:
            fitted, why = _fit(model, key, value, own[key])
            if fitted is None:
                report.skipped[key] = why
            else:
                accepted[key] = fitted
    report.loaded = sorted(accepted)
    report.fresh = sorted(set(own) - set(accepted))
    return accepted, report


def load_pretrained(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...] | None = None
) -> LoadReport:
    """:func:`fit_pretrained`, loaded into a plain (not parallelized) ``model``."""
    accepted, report = fit_pretrained(model, state, prefixes)
    model.load_state_dict(accepted, strict=False)
    return report
