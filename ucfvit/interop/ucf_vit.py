"""UCF-VIT checkpoints (irlyngaas/UCF-VIT at c114eeb) into ucfvit names.

UCF-VIT saves ``{"model_state_dict": ..., "optimizer_state_dict": ..., "epoch": ..., ...}`` with
``torch.save``: in its simple (DDP) mode one file, ``<name>_{even,odd}.ckpt``, whose keys start with
``module.``; in its fsdp mode one full (unsharded over FSDP) file per tensor-parallel rank,
``<name>_{even,odd}_rank_<r>.ckpt``, without prefix. What differs from ucfvit:

* fused ``attn.qkv`` in encoder and decoder blocks (split as for timm);
* the conv patch embedding is stored twice (``patch_embed.proj`` and its aliases ``token_embeds.*``);
  with variable embedding UCF-VIT shares that one kernel between all variables, which ucfvit's
  per-variable embedding gets as V equal copies;
* ``var_embed`` (1, V, D) -> (V, D); ``var_query`` -> ``var_agg.query``; its
  ``VariableMapping_Attention`` ``var_agg.{q, kv, proj}`` (no q/k/v bias) -> ``var_agg.attn.{q, k,
  v, proj}`` with zero q and v biases;
* learned ``pos_embed`` (1, [1 +] N, D): a class row, if any, is folded into ``cls_token``.
  UCF-VIT trains its tables, so build the ucfvit model with ``pos_embed="learned"``;
* tensor-parallel rank files are merged: ``qkv`` / ``kv`` per part and ``fc1`` by rows, ``proj``
  and ``fc2`` by columns, and their biases summed (each rank adds its bias before the all-reduce).

The MAE decoder and the ViT head convert too. UCF-VIT's ``decoder_norm`` uses LayerNorm eps 1e-5
(ucfvit: 1e-6), a difference of ~1e-6 relative. Not converted (they keep their UCF-VIT names, so
:func:`~ucfvit.interop.fit_pretrained` reports them as skipped): the UNETR decoder (MONAI blocks),
the SAP neck and the diffusion time embedding, whose layers differ from ucfvit's; and the
LayerNorm-Linear-LayerNorm embedding of adaptive patches, which is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .common import WeightsError, fold_class_row, split_qkv

__all__ = ["from_ucf_vit", "merge_tensor_parallel", "rank_files"]

# Tensor-parallel layout of UCF-VIT's fsdp building blocks: how rank files join, by name ending.
_JOIN: dict[str, int | str] = {
    "attn.qkv.weight": "parts3",
    "attn.qkv.bias": "parts3",
    "var_agg.kv.weight": "parts2",
    "attn.proj.weight": 1,
    "var_agg.proj.weight": 1,
    "mlp.fc2.weight": 1,
    "mlp.fc1.weight": 0,
    "mlp.fc1.bias": 0,
    "var_agg.q.weight": 0,
}
_SUMMED = ("attn.proj.bias", "mlp.fc2.bias", "var_agg.proj.bias")


def merge_tensor_parallel(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One full state dict from UCF-VIT's per-tensor-parallel-rank state dicts (rank order)."""
    out = {}
    for key in states[0]:
        parts = [s[key] for s in states]
        join = next((how for end, how in _JOIN.items() if key.endswith(end)), None)
        if key.endswith(_SUMMED):
            out[key] = torch.stack(parts).sum(0)
        elif isinstance(join, str):  # [q; k; v] (or [k; v]) blocks per rank: gather each block
            n = int(join[-1])
            chunks = [p.chunk(n) for p in parts]
            out[key] = torch.cat([torch.cat([c[i] for c in chunks]) for i in range(n)])
        elif join is not None:
            out[key] = torch.cat(parts, dim=join)
        else:
            out[key] = parts[0]  # replicated on every rank
    return out


def rank_files(path: str | Path) -> list[Path]:
    """``path`` and, if it is ``..._rank_0.ckpt``, its siblings ``_rank_1``, ``_rank_2``, ... in order."""
    path = Path(path)
    match = re.fullmatch(r"(.*_rank_)0(\.ckpt)", path.name)
    if match is None:
        return [path]
    files, r = [], 0
    while (candidate := path.with_name(f"{match.group(1)}{r}{match.group(2)}")).is_file():
        files.append(candidate)
        r += 1
    return files


def _model_state(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    state = checkpoint.get("model_state_dict")
    if not isinstance(state, Mapping):
        raise WeightsError(
            f"not a UCF-VIT checkpoint: expected a 'model_state_dict' entry; found keys {list(checkpoint)[:6]}"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def _variables(state: dict[str, torch.Tensor]) -> None:
    """In place: variable embedding and aggregation in ucfvit's layout."""
    if "var_embed" not in state:
        return
    state["var_embed"] = state["var_embed"][0].clone()
    if "var_query" not in state:  # single-channel: one patch embedding plus the variable's embedding
        return
    v = state["var_embed"].shape[0]
    for end in ("weight", "bias"):  # one kernel shared by every variable in UCF-VIT
        shared = state.pop(f"patch_embed.proj.{end}")
        state[f"patch_embed.{end}"] = shared.unsqueeze(0).expand(v, *shared.shape).clone()
    state["var_agg.query"] = state.pop("var_query")
    q = state.pop("var_agg.q.weight")
    k, w = state.pop("var_agg.kv.weight").chunk(2)
    state |= {"var_agg.attn.q.weight": q, "var_agg.attn.k.weight": k.clone(), "var_agg.attn.v.weight": w.clone()}
    state |= {"var_agg.attn.q.bias": q.new_zeros(q.shape[0]), "var_agg.attn.v.bias": q.new_zeros(q.shape[0])}
    for end in ("weight", "bias"):
        state[f"var_agg.attn.proj.{end}"] = state.pop(f"var_agg.proj.{end}")


def from_ucf_vit(checkpoints: Mapping | Sequence[Mapping]) -> dict[str, torch.Tensor]:
    """A UCF-VIT checkpoint (the loaded ``.ckpt``), or the list of its tensor-parallel rank files in
    rank order, in ucfvit names (see the module docstring for what converts)."""
    files = [checkpoints] if isinstance(checkpoints, Mapping) else list(checkpoints)
    states = [_model_state(c) for c in files]
    state = merge_tensor_parallel(states) if len(states) > 1 else states[0]
    if "token_embeds.0.weight" in state or "token_embeds.0.0.weight" in state:
        raise WeightsError(
            "this UCF-VIT model embeds adaptive patches with LayerNorm-Linear-LayerNorm (token_embeds.*), which "
            "ucfvit's adaptive patch embedding (one linear map) cannot express"
        )
    state = {k: v for k, v in state.items() if not k.startswith("token_embeds.")}  # aliases of patch_embed
    _variables(state)
    state = split_qkv(state)
    if "cls_token" in state and "pos_embed" in state:  # UCF-VIT's table has a class row iff a class token
        fold_class_row(state)
    return state
