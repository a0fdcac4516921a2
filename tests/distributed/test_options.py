"""New encoder options on the meta -> parallelize -> init path of a 1x2x2 mesh: learned_sincos tables,
LayerScale gammas and qk norms initialised on sharded parameters. The options in one process:
tests/unit/test_options.py."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from rank_runner import run_ranks
from ucfvit.models import build_model
from ucfvit.parallel import make_mesh, parallelize


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def meta_init_options(mesh_spec: str) -> dict:
    """learned_sincos tables, LayerScale gammas and qk norms initialised on sharded parameters."""
    kwargs = {"img_size": (16, 16), "pos_embed": "learned_sincos", "init_values": 0.25, "qk_norm": True}
    with torch.device("meta"):
        model = build_model("mae", "debug", **kwargs)
    parallelize(model, make_mesh(mesh_spec))
    model.to_empty(device="cpu")
    model.init_weights()
    ref = build_model("mae", "debug", **kwargs)
    return {
        "pos_diff": max(
            (_full(getattr(model, n)) - getattr(ref, n)).abs().max().item() for n in ("pos_embed", "decoder_pos_embed")
        ),
        "gamma_ok": all(bool(_full(b.ls1.gamma).eq(0.25).all()) for b in model.blocks),
        "qk_norm_ok": all(bool(_full(b.attn.q_norm.weight).eq(1).all()) for b in model.blocks),
    }


def test_meta_init_of_new_options_under_parallelize():
    for rank in run_ranks(4, meta_init_options, "1x2x2"):
        assert rank["pos_diff"] == 0 and rank["gamma_ok"] and rank["qk_norm_ok"], rank
