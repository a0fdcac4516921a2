"""Worker side of tests for errors, user models and meta-device initialisation."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from ucfvit.models import build_model, grid_patches
from ucfvit.parallel import clip_grad_norm_, full_state_dict, local_batch_range, make_mesh, parallelize

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))


def error_message(mesh_spec: str, heads: int | None = None, options: dict | None = None) -> str:
    """The error each rank raises for ``mesh_spec`` (and a ``heads``-head model parallelized with
    ``options``), or 'no error'."""
    try:
        mesh = make_mesh(mesh_spec)
        if heads is not None:
            parallelize(build_model("vit", "debug", embed_dim=heads * 8, num_heads=heads), mesh, **(options or {}))
    except ValueError as err:
        return f"ValueError: {err}"
    return "no error"


def _full(t):
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def user_model(mesh_spec: str) -> dict:
    """The example's TinyTransformer with its own plan against a single-process reference."""
    from custom_model import PLAN, TinyTransformer

    torch.manual_seed(0)
    ref = TinyTransformer()
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    x = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(1))
    ref_loss = ref(x)
    ref_loss.backward()
    mesh = make_mesh(mesh_spec)
    model = TinyTransformer()
    model.load_state_dict(state)
    parallelize(model, mesh, plan=PLAN, blocks=["layers.*"])
    rows = local_batch_range(mesh, 4)
    loss = model(x[rows.start : rows.stop])
    loss.backward()
    # ref.forward averages over all 4 samples: the mean of per-rank means is the same value.
    grads = {n: _full(p.grad) for n, p in model.named_parameters()}
    loss_all = loss.detach().clone()
    torch.distributed.all_reduce(loss_all)
    return {
        "loss_diff": abs(loss_all.item() / torch.distributed.get_world_size() - ref_loss.item()),
        "grad_diff": max((grads[n] - p.grad).abs().max().item() for n, p in ref.named_parameters()),
        "sharded": sum(isinstance(p, DTensor) for p in model.parameters()),
    }


def meta_init(family: str, mesh_spec: str) -> dict:
    """Build on meta, parallelize, ``to_empty`` + ``init_weights``; then load a full state dict."""
    kwargs = dict(img_size=(16, 16))
    with torch.device("meta"):
        model = build_model(family, "debug", **kwargs)
    mesh = make_mesh(mesh_spec)
    parallelize(model, mesh)
    model.to_empty(device="cpu")
    model.init_weights()
    finite = all(bool(torch.isfinite(_full(p)).all()) for p in model.parameters())
    torch.manual_seed(0)
    ref = build_model(family, "debug", **kwargs)
    buffers_ok = all(
        torch.equal(b, rb) for (_, b), (_, rb) in zip(model.named_buffers(), ref.named_buffers(), strict=True)
    )
    q_std = _full(model.blocks[0].attn.q.weight).std().item()  # xavier-uniform: sqrt(2 / (fan_in + fan_out))
    set_model_state_dict(model, ref.state_dict(), options=StateDictOptions(full_state_dict=True))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model.eval(), ref.eval()
    args = {"diffusion": (x, torch.tensor([3, 7])), "sap": (grid_patches(x, ref.patch_size),)}.get(family, (x,))
    gen = torch.Generator
    out = model(*args, rng=gen().manual_seed(0))
    ref_out = ref(*args, rng=gen().manual_seed(0))
    out, ref_out = (o[0] if isinstance(o, tuple) else o for o in (out, ref_out))
    exported = full_state_dict(model)
    rank = torch.distributed.get_rank()
    return {
        "finite": finite, "buffers_ok": buffers_ok, "q_std": q_std,
        "out_diff": (out - ref_out).abs().max().item(),
        "export_ok": rank != 0 or all(torch.equal(exported[k], v) for k, v in ref.state_dict().items()),
    }  # fmt: skip


def clip_matches_reference(mesh_spec: str, max_norm: float) -> dict:
    """Gradient clipping on a parallelized MAE equals torch's clip on the reference model."""
    torch.manual_seed(0)
    ref = build_model("mae", "debug", img_size=(16, 16))
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    from ucfvit.models import SampleRNG

    ref.loss(x, *ref(x, rng=SampleRNG(0, 0, 0, 8))).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    mesh = make_mesh(mesh_spec)
    model = build_model("mae", "debug", img_size=(16, 16))
    model.load_state_dict(state)
    parallelize(model, mesh)
    rows = local_batch_range(mesh, 8)
    xs = x[rows.start : rows.stop]
    model.loss(xs, *model(xs, rng=SampleRNG(0, 0, rows.start, 8))).backward()
    norm = clip_grad_norm_(model.parameters(), max_norm)
    grads = {n: _full(p.grad) for n, p in model.named_parameters()}
    return {
        "norm_diff": abs(norm.item() - ref_norm.item()) / ref_norm.item(),
        "grad_diff": max((grads[n] - p.grad).abs().max().item() for n, p in ref.named_parameters()),
        "clipped": ref_norm.item() > max_norm,
    }
