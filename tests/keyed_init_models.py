"""The models the keyed-initialisation tests build: every family, plain and with every option that
brings parameters of its own, and a bitwise digest of a state dict."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ucfvit.models import build_model

SEED = 20260607

IMG = (16, 16)

# Per family: the plain debug model, then one with every option that brings parameters of its own
# (per-variable embeddings and aggregation, LayerScale, q/k norms, learned tables, 3D convs).
MODELS = [
    ("vit", {"num_classes": 3}),  # a (3, D) head: uneven FSDP shards
    ("mae", {}),
    ("unetr", {}),
    ("sap", {}),
    ("diffusion", {}),
    ("vit", {"qk_norm": True, "init_values": 0.1, "pos_embed": "learned", "use_varemb": True,
             "variables": ["a", "b", "c"], "num_classes": 3}),
    ("mae", {"pos_embed": "learned_sincos", "single_channel": True, "variables": ["a", "b"], "init_values": 0.1}),
    ("unetr", {"img_size": [8, 8, 8], "use_varemb": True, "variables": ["a", "b"], "num_classes": 3}),
    ("sap", {"use_adaptive_pos_emb": True, "qk_norm": True}),
    ("diffusion", {"pos_embed": "learned", "use_varemb": True, "variables": ["a", "b", "c"]}),
]  # fmt: skip


def build(family: str, overrides: dict) -> nn.Module:
    return build_model(family, "debug", **{"img_size": IMG, **overrides})


def digests(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """sha256 of every tensor's bytes (with its dtype and shape): bitwise comparison in a few bytes."""
    out = {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        head = f"{t.dtype} {tuple(t.shape)} ".encode()
        out[name] = hashlib.sha256(head + t.view(torch.uint8).numpy().tobytes()).hexdigest()
    return out
