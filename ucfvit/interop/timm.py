"""timm's ``VisionTransformer`` state dicts <-> ucfvit's :class:`~ucfvit.models.ViT`.

What differs:

* timm fuses ``attn.qkv`` (3D, D) with rows ``[q; k; v]``, each head-major; ucfvit has separate
  ``attn.q``, ``attn.k``, ``attn.v`` and no key bias (see :func:`~ucfvit.interop.common.split_qkv`).
* timm's ``pos_embed`` has one row per prefix token, added to the class token; ucfvit's table
  holds patch rows only, so the class row is folded into ``cls_token``.
* Every other name (``patch_embed.proj``, ``blocks.N.{norm1,norm2,ls1,ls2,mlp.*}``,
  ``attn.{proj,q_norm,k_norm}``, ``norm``, ``fc_norm``, ``head``) is the same.

Build the ucfvit model with the timm model's options (``global_pool``, ``class_token``,
``qk_norm``, ``init_values``, ``pos_embed="learned"``, ...) and ``load_state_dict`` the result.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .common import WeightsError, fold_class_row, fuse_qkv, split_qkv, unsupported_features, with_class_row

__all__ = ["from_timm", "to_timm"]


def from_timm(state: Mapping[str, torch.Tensor], num_prefix_tokens: int = 1) -> dict[str, torch.Tensor]:
    """A timm ViT state dict (class token + ``num_prefix_tokens`` position rows) in ucfvit names."""
    if num_prefix_tokens not in (0, 1):
        raise WeightsError(f"num_prefix_tokens={num_prefix_tokens}: only a class token (1) or none (0) is supported")
    out = split_qkv(state)
    if num_prefix_tokens and "pos_embed" in out:
        fold_class_row(out)
    return out


def to_timm(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A timm ``VisionTransformer`` state dict with the outputs of ucfvit ViT ``model``.

    Load it into ``timm.create_model(..., global_pool=<model's>, class_token=<model's>,
    qk_norm=<model's>, init_values=<model's>, fc_norm=<model's use_fc_norm>)`` of the same size.
    Refused for what timm's ViT cannot express (:func:`unsupported_features`).
    """
    unsupported = unsupported_features(model)
    if unsupported:
        raise WeightsError(f"timm's VisionTransformer has no equivalent of this model's {', '.join(unsupported)}")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["pos_embed"] = with_class_row(model.pos_embed, model.num_prefix_tokens)
    return fuse_qkv(state)
