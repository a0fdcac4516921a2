"""Worker side of the parity tests: a parallelized model against a single-process reference
that sees the whole global batch (same state dict, same samples, same masks and drop path)."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from ucfvit.models import SampleRNG, build_model, grid_patches
from ucfvit.parallel import local_batch_range, make_mesh, parallelize

GLOBAL_BATCH, STEPS, SEED = 8, 3, 1234
IMG = (16, 16)


def build(family: str, overrides: dict | None = None) -> torch.nn.Module:
    kwargs = dict(img_size=IMG, drop_path_rate=0.1)
    if family in ("vit", "unetr", "sap"):
        kwargs["num_classes"] = 3
    if family == "unetr":
        kwargs["patch_size"] = 4
    kwargs.update(overrides or {})
    torch.manual_seed(0)
    return build_model(family, "debug", **kwargs)


def global_data(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {
        "x": torch.randn(GLOBAL_BATCH, 3, *IMG, generator=g),
        "label": torch.randint(0, 3, (GLOBAL_BATCH,), generator=g),
        "seg": torch.randint(0, 3, (GLOBAL_BATCH, *IMG), generator=g),
        "noise": torch.randn(GLOBAL_BATCH, 3, *IMG, generator=g),
        "t": torch.randint(0, 1000, (GLOBAL_BATCH,), generator=g),
    }


def loss_fn(family: str, model, data: dict[str, torch.Tensor], rng: SampleRNG) -> torch.Tensor:
    """Mean over samples, so splitting a batch changes nothing."""
    x = data["x"]
    if family == "vit":
        return F.cross_entropy(model(x, rng=rng), data["label"])
    if family == "mae":
        return model.loss(x, *model(x, rng=rng))
    if family == "unetr":
        return F.cross_entropy(model(x, rng=rng), data["seg"])
    if family == "sap":
        return F.cross_entropy(model(*grid_patches(x, model.patch_size), rng=rng), data["seg"])
    noised = x * 0.8 + data["noise"] * 0.6
    return (model(noised, data["t"], rng=rng) - data["noise"]).pow(2).mean()


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().cpu()


def train(model, family: str, rows: range, accum: int, mesh=None) -> tuple[float, dict, dict]:
    """3 AdamW steps on samples ``rows`` of every global batch, accumulating ``accum`` micro-batches.

    Returns the step-1 global loss, step-1 gradients and final parameters, all unsharded."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.05)
    micro = len(rows) // accum
    loss0 = grads0 = None
    for step in range(STEPS):
        data = global_data(step)
        total = 0.0
        for m in range(accum):
            start = rows.start + m * micro
            part = {k: v[start : start + micro] for k, v in data.items()}
            if accum > 1 and hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(m == accum - 1)
            loss = loss_fn(family, model, part, SampleRNG(SEED, step, start, GLOBAL_BATCH)) / accum
            loss.backward()
            total += loss.detach()
        if step == 0:
            if mesh is not None:  # mean over data-parallel ranks (tp ranks hold equal losses)
                total = total.clone()
                dist.all_reduce(total)
                total = total / dist.get_world_size()
            loss0 = float(total)
            grads0 = {n: _full(p.grad) for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss0, grads0, {n: _full(p) for n, p in model.named_parameters()}


def _max_rel(a: dict, b: dict) -> tuple[float, str]:
    worst, name = 0.0, ""
    for k in a:
        diff = (a[k] - b[k]).abs().max().item() / max(1.0, b[k].abs().max().item())
        if diff > worst:
            worst, name = diff, k
    return worst, name


def _max_abs(a: dict, b: dict) -> tuple[float, str]:
    worst, name = 0.0, ""
    for k in a:
        diff = (a[k] - b[k]).abs().max().item()
        if diff > worst:
            worst, name = diff, k
    return worst, name


def parity(family: str, cases: list[dict]) -> list[dict]:
    """Run each case ``{"mesh", "sp", "ac", "bf16", "accum", "compile", "model"}`` (``model``: keyword
    overrides of the model); on rank 0, report its deviations from the reference built with the
    same overrides (other ranks return an empty list)."""
    torch.set_num_threads(1)
    states: dict[str, dict] = {}
    runs = []
    for case in cases:
        overrides = case.get("model", {})
        key = json.dumps(overrides, sort_keys=True)
        if key not in states:
            states[key] = {k: v.clone() for k, v in build(family, overrides).state_dict().items()}
        mesh = make_mesh(case["mesh"])
        model = build(family, overrides)
        model.load_state_dict(states[key])
        parallelize(
            model, mesh,
            sequence_parallel=case.get("sp", False),
            activation_checkpointing=case.get("ac", "none"),
            param_dtype=torch.bfloat16 if case.get("bf16") else None,
            compile=case.get("compile", False),
        )  # fmt: skip
        rows = local_batch_range(mesh, GLOBAL_BATCH)
        runs.append((case, train(model, family, rows, case.get("accum", 1), mesh)))
    if dist.is_initialized() and dist.get_rank() != 0:
        return []
    references = {}
    for key, state in states.items():
        reference = build(family, json.loads(key))
        reference.load_state_dict(state)
        references[key] = train(reference, family, range(GLOBAL_BATCH), accum=1)
    results = []
    for case, (loss, grads, params) in runs:
        ref_loss, ref_grads, ref_params = references[json.dumps(case.get("model", {}), sort_keys=True)]
        grad_diff, grad_name = _max_rel(grads, ref_grads)
        param_diff, param_name = _max_abs(params, ref_params)
        results.append({
            **case, "loss_diff": abs(loss - ref_loss) / max(1.0, abs(ref_loss)),
            "grad_diff": grad_diff, "grad_name": grad_name, "param_diff": param_diff, "param_name": param_name,
            "same_names": sorted(grads) == sorted(ref_grads),
        })  # fmt: skip
    return results


def parity_families(jobs: list[list]) -> list[list[dict]]:
    """:func:`parity` for several ``[family, cases]`` jobs in one launch (one result list per job)."""
    return [parity(family, cases) for family, cases in jobs]
