"""Worker side of the parity tests: a parallelized model against a single-process reference
that sees the whole global batch (same state dict, same samples, same masks and drop path).

``parity(family, cases, overrides, inputs)``: ``overrides`` are extra model arguments, ``inputs``
("module:function") makes extra batch entries from the images, e.g. adaptive patch sequences
(``function(x, patch_size) -> {"patches", "coords", "sizes", "valid"}``)."""

from __future__ import annotations

import importlib
import json

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ucfvit.models import SampleRNG, build_model, get_family
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
    # The reference weights. UNETR's 3 AdamW steps (eps 1e-6) are sensitive to the order of float
    # sums at some seeds: at seeds 0 and 4 one process with micro-batches of 1 already ends 1e-3
    # away from one batch of 8, beyond the parity tolerance; at this seed 4e-5.
    torch.manual_seed(2)
    return build_model(family, "debug", **kwargs)


def global_data(step: int, img=IMG, inputs: str | None = None, patch_size: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    data = {
        "x": torch.randn(GLOBAL_BATCH, 3, *img, generator=g),
        "label": torch.randint(0, 3, (GLOBAL_BATCH,), generator=g),
        "seg": torch.randint(0, 3, (GLOBAL_BATCH, *img), generator=g),
    }
    if inputs:
        module, function = inputs.split(":")
        data.update(getattr(importlib.import_module(module), function)(data["x"], patch_size))
    return data


def loss_fn(family: str, model, data: dict[str, torch.Tensor], rng: SampleRNG) -> torch.Tensor:
    """The family's own task loss (a mean over samples, so splitting a batch changes nothing)."""
    spec = get_family(family)
    batch = {"image": data["x"], "label": data["label"], "seg": data["seg"]}
    batch.update({k: v for k, v in data.items() if k in ("patches", "coords", "sizes", "valid")})
    return spec.loss(model, batch, rng, spec.build_extra(model))


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().cpu()


def train(
    model, family: str, rows: range, accum: int, mesh=None, inputs: str | None = None
) -> tuple[float, dict, dict]:
    """3 AdamW steps on samples ``rows`` of every global batch, accumulating ``accum`` micro-batches.

    Returns the step-1 global loss, step-1 gradients and final parameters, all unsharded."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.05)
    micro = len(rows) // accum
    loss0 = grads0 = None
    for step in range(STEPS):
        data = global_data(step, model.img_size, inputs, model.patch_size)
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


def parity(family: str, cases: list[dict], overrides: dict | None = None, inputs: str | None = None) -> list[dict]:
    """Run each case ``{"mesh", "sp", "ac", "bf16", "accum", "compile", "wrap", "model"}`` (``model``: keyword
    overrides of the model, over ``overrides``); on rank 0, report its deviations from the reference
    built with the same overrides (other ranks return an empty list)."""
    torch.set_num_threads(1)
    states: dict[str, dict] = {}
    runs = []
    for case in cases:
        case_overrides = {**(overrides or {}), **case.get("model", {})}
        key = json.dumps(case_overrides, sort_keys=True)
        if key not in states:
            states[key] = {k: v.clone() for k, v in build(family, case_overrides).state_dict().items()}
        mesh = make_mesh(case["mesh"])
        model = build(family, case_overrides)
        model.load_state_dict(states[key])
        parallelize(
            model, mesh,
            sequence_parallel=case.get("sp", False),
            activation_checkpointing=case.get("ac", "none"),
            param_dtype=torch.bfloat16 if case.get("bf16") else None,
            compile=case.get("compile", False),
            wrap=case.get("wrap", "auto"),
        )  # fmt: skip
        rows = local_batch_range(mesh, GLOBAL_BATCH)
        runs.append((case, train(model, family, rows, case.get("accum", 1), mesh, inputs)))
    if dist.is_initialized() and dist.get_rank() != 0:
        return []
    references = {}
    for key, state in states.items():
        reference = build(family, json.loads(key))
        reference.load_state_dict(state)
        references[key] = train(reference, family, range(GLOBAL_BATCH), accum=1, inputs=inputs)
    results = []
    for case, (loss, grads, params) in runs:
        ref_loss, ref_grads, ref_params = references[
            json.dumps({**(overrides or {}), **case.get("model", {})}, sort_keys=True)
        ]
        grad_diff, grad_name = _max_rel(grads, ref_grads)
        param_diff, param_name = _max_abs(params, ref_params)
        results.append({
            **case, "loss_diff": abs(loss - ref_loss) / max(1.0, abs(ref_loss)),
            "grad_diff": grad_diff, "grad_name": grad_name, "param_diff": param_diff, "param_name": param_name,
            "same_names": sorted(grads) == sorted(ref_grads),
        })  # fmt: skip
    return results


def parity_jobs(jobs: list[dict]) -> list[list[dict]]:
    """Several ``parity(**job)`` runs in one launch (one process group), one result list per job."""
    return [parity(**job) for job in jobs]
