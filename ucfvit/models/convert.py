"""Weight conversion between timm's ``VisionTransformer`` state dict and ucfvit's :class:`~ucfvit.models.ViT`.

Small on purpose (the full interop with MAE/UCF-VIT checkpoints comes later). What differs:

* timm fuses ``attn.qkv`` (3D, D) with rows ``[q; k; v]``, each head-major; ucfvit has separate
  ``attn.q``, ``attn.k``, ``attn.v``. ucfvit has no key bias: softmax cancels it, so it is dropped
  (refused with ``qk_norm``, where a key bias passes through ``k_norm`` and does matter). For the
  same reason ``k_norm.bias`` is dropped.
* timm's ``pos_embed`` has one row per prefix token, added to the class token; ucfvit's table
  holds patch rows only, so the class row is folded into ``cls_token``.
* Every other name (``patch_embed.proj``, ``blocks.N.{norm1,norm2,ls1,ls2,mlp.*}``,
  ``attn.{proj,q_norm,k_norm}``, ``norm``, ``fc_norm``, ``head``) is the same.

Build the ucfvit model with the timm model's options (``global_pool``, ``class_token``,
``qk_norm``, ``init_values``, ``pos_embed="learned"``, ...) and ``load_state_dict`` the result.
:func:`timm_state_dict_from_vit` goes the other way (zero key bias, class position row zero, a
fixed sin-cos table written out as timm's learned one).
"""

from __future__ import annotations

import torch

__all__ = ["timm_state_dict_from_vit", "timm_vit_state_dict"]


def timm_vit_state_dict(state: dict[str, torch.Tensor], num_prefix_tokens: int = 1) -> dict[str, torch.Tensor]:
    """Convert a timm ViT state dict (class token + ``num_prefix_tokens`` position rows) to ucfvit names."""
    if num_prefix_tokens not in (0, 1):
        raise ValueError(f"num_prefix_tokens={num_prefix_tokens}: only a class token (1) or none (0) is supported")
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name.endswith("attn.qkv.weight"):
            base = name[: -len("qkv.weight")]
            for part, chunk in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[f"{base}{part}.weight"] = chunk.clone()
        elif name.endswith("attn.qkv.bias"):
            base = name[: -len("qkv.bias")]
            q_bias, k_bias, v_bias = value.chunk(3)
            if f"{base}k_norm.weight" in state and k_bias.abs().max() > 0:
                raise ValueError(f"{name}: a key bias before k_norm changes the output; ucfvit has no key bias")
            out[f"{base}q.bias"], out[f"{base}v.bias"] = q_bias.clone(), v_bias.clone()
        elif name.endswith("attn.k_norm.bias"):
            continue  # adds q.b to every score of a query: softmax cancels it (ucfvit's k_norm has no bias)
        elif name == "pos_embed":
            out["pos_embed"] = value[:, num_prefix_tokens:].clone()
        elif name == "cls_token":
            pos = state.get("pos_embed")
            out["cls_token"] = value + (pos[:, :1] if pos is not None and num_prefix_tokens else 0)
        else:
            out[name] = value
    return out


def timm_state_dict_from_vit(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A timm ``VisionTransformer`` state dict with the outputs of ucfvit ViT ``model``.

    Load it into ``timm.create_model(..., global_pool=<model's>, class_token=<model's>,
    qk_norm=<model's>, init_values=<model's>, fc_norm=<model's use_fc_norm>)`` of the same size.
    Refused for what timm's ViT cannot express: 3D inputs, rotary positions, adaptive patching and
    the variable-embedding modes.
    """
    unsupported = [
        name
        for name, on in (
            ("3D input", getattr(model, "ndim", 2) != 2),
            ("rope", getattr(model, "rope", False)),
            ("adaptive_patching", getattr(model, "adaptive_patching", False)),
            ("use_varemb", getattr(model, "use_varemb", False)),
            ("single_channel", getattr(model, "single_channel", False)),
        )
        if on
    ]
    if unsupported or getattr(model, "pos_embed", None) is None:
        what = ", ".join(unsupported) or "no position table (pos_embed='none')"
        raise ValueError(f"timm's VisionTransformer has no equivalent of this model's {what}")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    prefix = model.num_prefix_tokens
    pos = model.pos_embed.detach()
    state["pos_embed"] = torch.cat([pos.new_zeros(1, prefix, pos.shape[-1]), pos], dim=1) if prefix else pos.clone()
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name.endswith("attn.q.weight"):
            base = name[: -len("q.weight")]
            out[f"{base}qkv.weight"] = torch.cat([value, state[f"{base}k.weight"], state[f"{base}v.weight"]])
        elif name.endswith("attn.q.bias"):
            base = name[: -len("q.bias")]
            out[f"{base}qkv.bias"] = torch.cat([value, torch.zeros_like(value), state[f"{base}v.bias"]])
        elif name.endswith(("attn.k.weight", "attn.v.weight", "attn.v.bias")):
            continue  # fused above
        elif name.endswith("attn.k_norm.weight"):
            out[name], out[name[: -len("weight")] + "bias"] = value, torch.zeros_like(value)
        else:
            out[name] = value
    return out
