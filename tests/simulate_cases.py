"""Worker side of the simulator tests: the same step on a fake mesh (benchmarks/simulate.py) and for real."""

from __future__ import annotations

import itertools

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor.debug import CommDebugMode

from benchmarks.simulate import fake_world, parse_args, trace, trace_at_depth
from ucfvit.data.synthetic import SyntheticImages
from ucfvit.parallel import CommVolume, clip_grad_norm_, local_batch_range, make_mesh, parallelize, parse_mesh
from ucfvit.train.optim import build_optimizer
from ucfvit.train.plan import build_checked_model
from ucfvit.train.trainer import accumulate_gradients


def _key(row: dict) -> str:
    return f"{row['dims']}/{row['op']}"


def _totals(rows: list[dict]) -> dict[str, dict]:
    """Collectives summed per (mesh dimension, operation) over both phases of the step."""
    out: dict[str, dict] = {}
    for row in rows:
        t = out.setdefault(_key(row), {"count": 0, "payload_bytes": 0, "sent_bytes": 0.0})
        for n in t:
            t[n] += row[n]
    return out


def simulated(argvs: list[list[str]]) -> list[dict]:
    """``benchmarks/simulate.py``'s traced step for each command line (fake process group)."""
    out = []
    for argv in argvs:
        _, cfg, _ = parse_args(argv)
        t = trace(cfg)
        out.append({"counts": t["comm_counts"], "totals": _totals(t["comm"]), "rows": t["comm"]})
    return out


def real(argvs: list[list[str]]) -> list[dict]:
    """The same step for real on gloo ranks: the trainer's optimizer, real tensors, real collectives;
    counted by a plain CommDebugMode and measured by CommVolume."""
    torch.set_num_threads(1)
    return [_real_step(argv) for argv in argvs]


def _real_step(argv: list[str]) -> dict:
    _, cfg, _ = parse_args(argv)
    shape = parse_mesh(cfg.mesh)
    spec, model = build_checked_model(cfg, shape)
    mesh = make_mesh(shape)
    parallelize(model, mesh, **cfg.parallel.parallelize_options("cuda"))  # as the simulator: the GPU recipe's bf16
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    model.train()
    optimizer = build_optimizer(model, cfg, "cpu")
    rows = local_batch_range(mesh, cfg.data.global_batch_size)
    data = SyntheticImages(model.img_size, model.in_chans, cfg.data.num_classes, seed=0)
    batches = itertools.repeat(data.batch(rows))
    device = torch.device("cpu")

    def step(number: int) -> None:
        accumulate_gradients(model, spec, batches, mesh, cfg, number, 1, len(rows), None, device)
        clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(0)
    with CommDebugMode() as plain, CommVolume(mesh) as volume:
        step(1)
    counts = {str(op).split(".")[-1]: n for op, n in plain.get_comm_counts().items()}
    measured = [
        {"dims": c.dims, "op": c.op, "count": 1, "payload_bytes": c.payload_bytes, "sent_bytes": c.sent_bytes}
        for c in volume.collectives
    ]
    tokens = model.num_patches + model.num_prefix_tokens
    return {
        "counts": counts, "totals": _totals(measured), "local_batch": len(rows), "tokens": tokens,
        "embed_dim": model.embed_dim, "depth": len(model.blocks),
    }  # fmt: skip


def fsdp_allocation(argv: list[str]) -> dict:
    """What ``fully_shard`` allocates on rank 0 for the parameters: each FSDP parameter's padded
    local shard (``FSDPParam._sharded_param_data``), summed; the model built as the simulator does."""
    _, cfg, _ = parse_args(argv)
    shape = parse_mesh(cfg.mesh)
    _, model = build_checked_model(cfg, shape)
    numel = sum(p.numel() for p in model.parameters())
    fake_world(shape.world_size)
    parallelize(model, make_mesh(shape, device_type="cpu"), param_dtype=torch.bfloat16)
    total, params = 0, 0
    for module in model.modules():
        if isinstance(module, FSDPModule):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                for fsdp_param in group.fsdp_params:
                    data = fsdp_param._sharded_param_data
                    total += data.numel() * data.element_size()
                    params += 1
    return {"bytes": total, "fsdp_params": params, "model_params": len(list(model.parameters())), "numel": numel}


def extrapolated_and_exact(argv: list[str]) -> dict:
    """:func:`trace_at_depth` extended from depths 3 and 4, and the real depth traced."""
    _, cfg, _ = parse_args(argv)
    return {"extended": trace_at_depth(cfg), "exact": trace_at_depth(cfg, exact=True)}


def checkpointing_choices(argv: list[str], mesh: str) -> dict:
    """What the search picks for ``mesh`` at budgets between the peaks of its checkpointing modes, with
    the GPU recipe's compile and with ``--parallel.no-compile``."""
    from benchmarks.simulate import evaluate_mesh

    _, cfg, cluster = parse_args([*argv, "--mesh", mesh])
    shape = parse_mesh(mesh)
    _, loose, _ = parse_args([*argv, "--mesh", mesh, "--parallel.no-compile"])
    peaks = {}
    for ac in ("full", "none", "selective"):
        trial = type(loose).from_dict(loose.to_dict())
        trial.parallel.activation_checkpointing = ac
        peaks[ac] = trace(trial)["memory"]["peak"] / 2**30
    budget = (peaks["full"] + min(peaks["none"], peaks["selective"])) / 2  # only full fits
    return {
        "peaks": peaks,
        "compiled": evaluate_mesh(cfg, shape, cluster, budget, exact=True),
        "eager": evaluate_mesh(loose, shape, cluster, budget, exact=True),
    }
