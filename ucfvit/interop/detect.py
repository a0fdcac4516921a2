"""Which project a weights file comes from, told by its keys, and its state dict in ucfvit names."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .common import WeightsError
from .files import read_weights
from .mae import from_mae_reference
from .timm import from_timm
from .ucf_vit import from_ucf_vit, rank_files

__all__ = ["read_pretrained", "to_ucfvit_names"]


def to_ucfvit_names(contents: Mapping[str, Any], where: str = "weights") -> tuple[dict[str, torch.Tensor], str]:
    """``(state dict in ucfvit names, what it was)`` for what :func:`~ucfvit.interop.read_weights`
    returned: a ucfvit state dict or export, a timm ViT state dict, or an MAE reference checkpoint
    (``{"model": ...}``), or a UCF-VIT checkpoint (``{"model_state_dict": ...}``, one file). Position
    tables come back as patch-row tables, fixed or not, for :func:`~ucfvit.interop.fit_pretrained` to judge."""
    if "model_state_dict" in contents:
        return from_ucf_vit(contents), "UCF-VIT checkpoint"
    inner = contents.get("model", contents)
    keys = list(inner) if isinstance(inner, Mapping) else []
    if any(k.endswith("attn.qkv.weight") for k in keys):
        if inner is not contents or any(k.startswith("decoder_") for k in keys):
            return from_mae_reference(contents, pos_embed="learned"), "MAE reference checkpoint"
        return from_timm(inner), "timm ViT state dict"
    if any(k.endswith("attn.q.weight") for k in keys):
        return {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}, "ucfvit state dict"
    raise WeightsError(
        f"{where}: not a weights layout ucfvit knows. Expected a ucfvit state dict or export "
        "(blocks.N.attn.q.weight), a timm ViT state dict (blocks.N.attn.qkv.weight), an MAE reference "
        f"checkpoint ({{'model': ...}}) or a UCF-VIT one ({{'model_state_dict': ...}}); found keys {list(contents)[:8]}"
    )


def read_pretrained(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """A weights file read safely (:func:`~ucfvit.interop.read_weights`) and put in ucfvit names by
    :func:`to_ucfvit_names`; a UCF-VIT ``..._rank_0.ckpt`` brings its other tensor-parallel ranks."""
    files = rank_files(path)
    contents = [read_weights(f) for f in files]
    if len(files) > 1 and all("model_state_dict" in c for c in contents):
        return from_ucf_vit(contents), f"UCF-VIT checkpoint ({len(files)} tensor-parallel rank files)"
    return to_ucfvit_names(contents[0], str(path))
