"""Initialise a model from pretrained weights in ucfvit names, reporting what was used.

For fine-tuning: an MAE's encoder into a ViT, UNETR or SAP, a classifier's backbone into a new
head, a checkpoint of another image size. Entries are matched by name; a learned position table
of another grid is resized by the model's own ``load_state_dict``; a convolutional patch
embedding (D, C, *p) becomes the linear one of an adaptive model (D, C * p**ndim), the same map.
Anything else that does not fit is skipped with its reason, never loaded half-way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

__all__ = ["LoadReport", "load_pretrained"]


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did: ``loaded`` and ``fresh`` (the model's entries that kept
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


def _fit(value: torch.Tensor, target: torch.Tensor, key: str) -> tuple[torch.Tensor | None, str]:
    """``value`` shaped for ``target``, or None and why not."""
    if value.shape == target.shape:
        return value, ""
    table = key in ("pos_embed", "decoder_pos_embed") and value.ndim == 3 and value.shape[::2] == target.shape[::2]
    if table:
        return value, ""  # a position table of another grid: resized by the model's load_state_dict
    if key.endswith("patch_embed.proj.weight") and target.ndim == 2 and value.flatten(1).shape == target.shape:
        return value.flatten(1), ""  # conv kernel over (C, *p) == linear over the flattened patch
    return None, f"shape {tuple(value.shape)} does not fit the model's {tuple(target.shape)}"


def load_pretrained(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...] | None = None
) -> LoadReport:
    """Load the entries of ``state`` (ucfvit names) that fit ``model``; only names starting with one
    of ``prefixes`` when given (e.g. :data:`~ucfvit.interop.mae.ENCODER_PREFIXES`)."""
    own = model.state_dict()
    report, accepted = LoadReport(), {}
    for key, value in state.items():
        if prefixes is not None and not key.startswith(prefixes):
            report.skipped[key] = "not among the parts to initialise"
        elif key not in own:
            report.skipped[key] = "the model has no such entry (or computes it, e.g. a fixed sin-cos table)"
        else:
            fitted, why = _fit(value, own[key], key)
            if fitted is None:
                report.skipped[key] = why
            else:
                accepted[key] = fitted
    result = model.load_state_dict(accepted, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # accepted holds model names only
    report.loaded = sorted(accepted)
    report.fresh = sorted(result.missing_keys)
    return report
