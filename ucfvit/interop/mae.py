"""Checkpoints of the MAE reference (facebookresearch/mae, ``models_mae.MaskedAutoencoderViT``) <->
ucfvit's :class:`~ucfvit.models.MAE`, and its encoder into any ucfvit family for fine-tuning.

The reference saves ``{"model": state_dict, ...}`` with timm ``Block`` names. What differs:

* fused ``attn.qkv`` in encoder and decoder blocks (split as for timm);
* ``pos_embed`` (1, 1 + N, D) and ``decoder_pos_embed`` (1, 1 + N, Dd) have a class-token row
  (zero in the reference's sin-cos tables). The encoder's is folded into ``cls_token``; the
  decoder's must be zero, because ucfvit's decoder adds positions to patch tokens only;
* the patch rows are the fixed 2D sin-cos table, which ucfvit recomputes (``pos_embed='sincos'``,
  the MAE default; checked, then dropped) or keeps as a learned table (``pos_embed='learned'``).

Build the ucfvit MAE with the reference's sizes (``embed_dim``, ``depth``, ``num_heads``,
``decoder_*``, ``patch_size``, ``img_size``, ``mask_ratio``, ``norm_pix_loss``) and load the result:
with the same masking noise the reconstruction is the reference's.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .common import (
    WeightsError,
    fold_class_row,
    fuse_qkv,
    sincos_or_learned,
    split_qkv,
    unsupported_features,
    with_class_row,
)

__all__ = ["ENCODER_PREFIXES", "encoder_only", "from_mae_reference", "to_mae_reference"]

# Names of the encoder in ucfvit (every family; the MAE reference has the first five).
ENCODER_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.", "var_embed", "var_agg.")


def _model_state(checkpoint: Mapping) -> Mapping[str, torch.Tensor]:
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, Mapping) or "blocks.0.attn.qkv.weight" not in state:
        keys = ", ".join(list(checkpoint)[:6])
        raise WeightsError(
            "not an MAE reference checkpoint: expected {'model': {...}} (or the state dict itself) holding "
            f"'blocks.0.attn.qkv.weight'; found keys {keys}"
        )
    return state


def from_mae_reference(checkpoint: Mapping, pos_embed: str = "sincos") -> dict[str, torch.Tensor]:
    """An MAE reference checkpoint (``{"model": ...}`` or its state dict) in ucfvit's MAE names.

    ``pos_embed``: the ucfvit model's option: ``"sincos"`` drops the reference's fixed tables after
    checking them, ``"learned"`` keeps them as learned tables. An encoder-only checkpoint
    (``mae_pretrain_vit_*.pth``) gives an encoder-only state dict (see :func:`encoder_only`).
    """
    out = split_qkv(_model_state(checkpoint))
    if "pos_embed" in out:
        fold_class_row(out)
        sincos_or_learned(out, "pos_embed", pos_embed)
    if "decoder_pos_embed" in out:
        table = out["decoder_pos_embed"]
        if table[:, :1].abs().max() > 0:
            raise WeightsError(
                "decoder_pos_embed has a non-zero class-token row; ucfvit's decoder adds positions to patch tokens only"
            )
        out["decoder_pos_embed"] = table[:, 1:].clone()
        sincos_or_learned(out, "decoder_pos_embed", pos_embed)
    return out


def encoder_only(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's entries of a ucfvit state dict (patch and variable embeddings, class token,
    positions, blocks, final norm): what a ViT, UNETR or SAP takes from a pretrained MAE."""
    return {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}


def to_mae_reference(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{"model": state_dict}`` that the MAE reference's ``MaskedAutoencoderViT`` of the same sizes
    loads, with the same reconstructions. Refused for what it cannot express."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    unsupported = unsupported_features(model)
    unsupported += [
        name
        for name, on in (
            ("linear_decoder", getattr(model, "linear_decoder", True)),
            ("class_token=False", getattr(model, "cls_token", None) is None),
            ("qk_norm", any(k.endswith("q_norm.weight") for k in state)),
            ("LayerScale (init_values)", any(k.endswith("ls1.gamma") for k in state)),
        )
        if on
    ]
    if unsupported:
        raise WeightsError(f"the MAE reference has no equivalent of this model's {', '.join(unsupported)}")
    state["pos_embed"] = with_class_row(model.pos_embed, 1)
    state["decoder_pos_embed"] = with_class_row(model.decoder_pos_embed, 1)
    return {"model": fuse_qkv(state)}
