"""Model registry: ``build_model(family, size=..., **overrides)``.

Size presets follow their papers: ``tiny``/``small`` (DeiT), ``base``/``large``/``huge`` (ViT),
``giant`` (ViT-g/14 of "Scaling Vision Transformers"); decoders follow MAE (512 wide, 8 blocks,
16 heads). ``debug`` is a fast CPU model whose head counts divide by 2, 4 and 8, so every small
test mesh can shard it.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .diffusion import DiffusionViT
from .mae import MAE
from .sap import SAP
from .unetr import UNETR
from .vit import ViT

__all__ = ["MODELS", "SIZES", "build_model", "list_models", "list_sizes", "model_arguments"]

MODELS: dict[str, type[nn.Module]] = {"vit": ViT, "mae": MAE, "unetr": UNETR, "sap": SAP, "diffusion": DiffusionViT}

_MAE_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)

SIZES: dict[str, dict[str, Any]] = {
    "debug": dict(
        img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=8,
        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=8, feature_size=8,
    ),
    "tiny": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, **_MAE_DECODER),
    "small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, **_MAE_DECODER),
    "base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, **_MAE_DECODER),
    "large": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_MAE_DECODER),
    "huge": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_MAE_DECODER),
    "giant": dict(patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=6144 / 1408, **_MAE_DECODER),
}  # fmt: skip


def model_arguments(family: type[nn.Module]) -> set[str]:
    """Keyword arguments a model class accepts (its own and those of its base classes)."""
    names: set[str] = set()
    for cls in family.__mro__:
        if cls is nn.Module or "__init__" not in vars(cls):
            continue
        params = inspect.signature(cls.__init__).parameters.values()
        names |= {p.name for p in params if p.kind is p.KEYWORD_ONLY}
    return names - {"out_chans"}


def list_models() -> list[str]:
    return list(MODELS)


def list_sizes() -> list[str]:
    return list(SIZES)


def build_model(name: str, size: str = "base", **overrides: Any) -> nn.Module:
    """Build family ``name`` (``vit|mae|unetr|sap|diffusion``) at preset ``size`` with overrides.

    Preset keys that a family does not use (e.g. decoder sizes for ViT) are dropped; an override
    the family does not accept is an error. Build under ``torch.device("meta")`` to get a model
    without memory, then ``to_empty`` + ``init_weights()``.
    """
    if name not in MODELS:
        raise ValueError(f"model={name!r} is unknown; choose one of {list_models()}")
    if size not in SIZES:
        raise ValueError(f"size={size!r} is unknown; choose one of {list_sizes()}")
    family = MODELS[name]
    accepted = model_arguments(family)
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(f"{name} does not take {unknown}; allowed arguments: {sorted(accepted)}")
    kwargs = {k: v for k, v in SIZES[size].items() if k in accepted}
    kwargs.update(overrides)
    model = family(**kwargs)
    model.init_weights()
    return model
