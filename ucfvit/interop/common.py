"""Renamings shared by the converters: fused ``qkv`` <-> ``q``/``k``/``v``, class-token position rows,
and fixed sin-cos tables that ucfvit recomputes instead of storing."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..models.embed import grid_coords, sincos_embed

__all__ = [
    "WeightsError",
    "fold_class_row",
    "fuse_qkv",
    "is_sincos_table",
    "sincos_or_learned",
    "split_qkv",
    "unsupported_features",
    "with_class_row",
]


class WeightsError(ValueError):
    """A weights file or state dict that cannot be read or converted; the message names the key or file."""


def split_qkv(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every ``*attn.qkv.{weight,bias}`` (rows ``[q; k; v]``, each head-major, as timm and the MAE
    reference) split into ucfvit's ``q``, ``k``, ``v``. The key bias is dropped (softmax cancels it:
    it adds ``q . b_k`` to every score of a query), as is ``k_norm.bias``; a non-zero key bias
    before ``k_norm`` does change the output and is refused."""
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
                raise WeightsError(f"{name}: a key bias before k_norm changes the output; ucfvit has no key bias")
            out[f"{base}q.bias"], out[f"{base}v.bias"] = q_bias.clone(), v_bias.clone()
        elif name.endswith("attn.k_norm.bias"):
            continue
        else:
            out[name] = value
    return out


def fuse_qkv(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`split_qkv`: ``q``/``k``/``v`` fused into ``qkv`` with a zero key bias,
    and a zero ``k_norm.bias`` next to every ``k_norm.weight``."""
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


def fold_class_row(state: dict[str, torch.Tensor], table: str = "pos_embed", token: str = "cls_token") -> None:
    """In place: a table (1, 1 + N, D) whose first row is the class token's position loses that row,
    which is added to ``token`` (ucfvit's tables hold patch rows only)."""
    rows = state[table]
    state[table] = rows[:, 1:].clone()
    if token in state:
        state[token] = state[token] + rows[:, :1]


def is_sincos_table(table: torch.Tensor, ndim: int = 2) -> bool:
    """Whether patch-row table (1, N, D) is the fixed sin-cos table ucfvit computes (MAE's
    ``get_2d_sincos_pos_embed`` layout in 2D) for a square (cubic) grid of N patches."""
    side = round(table.shape[1] ** (1 / ndim))
    if side**ndim != table.shape[1]:
        return False
    expect = sincos_embed(grid_coords((side,) * ndim).double(), table.shape[-1])
    return torch.allclose(table[0].double(), expect.double(), atol=1e-5, rtol=0)


def sincos_or_learned(state: dict[str, torch.Tensor], name: str, pos_embed: str) -> None:
    """In place: keep patch-row table ``name`` (1, N, D) for a model built with ``pos_embed='learned'``,
    or drop it for ``pos_embed='sincos'`` after checking :func:`is_sincos_table`."""
    if pos_embed in ("learned", "learned_sincos"):
        return
    if pos_embed != "sincos":
        raise WeightsError(f"pos_embed={pos_embed!r}: choose 'sincos' (drop a fixed table) or 'learned' (keep it)")
    table = state.pop(name)
    if not is_sincos_table(table):
        raise WeightsError(
            f"{name} is not the fixed sin-cos table of a square grid of {table.shape[1]} patches (it was trained "
            "or laid out differently); build the model with pos_embed='learned' and convert with "
            "pos_embed='learned' to keep it"
        )


def unsupported_features(model: torch.nn.Module) -> list[str]:
    """What a plain 2D ViT with a grid position table (timm's, the MAE reference's) cannot express."""
    found = [
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
    if getattr(model, "pos_embed", None) is None:
        found.append("no position table (pos_embed='none')")
    return found


def with_class_row(table: torch.Tensor, prefix: int) -> torch.Tensor:
    """A patch-row table (1, N, D) with ``prefix`` zero rows in front (a fixed table written out too)."""
    table = table.detach()
    return torch.cat([table.new_zeros(1, prefix, table.shape[-1]), table], dim=1) if prefix else table.clone()
