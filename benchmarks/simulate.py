"""Plan a run on thousands of GPUs from one CPU: memory and communication per rank, and a mesh search.

    python benchmarks/simulate.py --model vit --size giant --mesh 16x32x8
    python benchmarks/simulate.py --model mae --size huge --mesh 4x16x8 --parallel.activation-checkpointing selective
    python benchmarks/simulate.py --model vit --arch.embed-dim 12288 --arch.depth 62 --arch.num-heads 96 \\
        --search --cluster frontier --nodes 1024 --top 8

One process pretends to be rank 0 of the whole job: the ``fake`` process-group backend gives it a
mesh of any size without communicating, the model is built on the meta device and parallelized with
``parallelize`` exactly as ``recipes/train.py`` does, and one training step (the trainer's own
``accumulate_gradients``, gradient clipping and AdamW) runs under ``FakeTensorMode``: every tensor
has its real shape, dtype and placement, but no data and no kernels. Measured on that step:

- memory of rank 0: parameters, gradients and optimizer state (the local shards FSDP allocates)
  and the peak of the step by kind (saved activations, gathered parameters, communication buffers,
  temporaries), from ``torch.distributed._tools.FSDPMemTracker``: allocated bytes, not the
  allocator's reserve;
- communication of rank 0 per mesh dimension and collective: calls, payload and bytes sent, from
  :class:`ucfvit.parallel.CommVolume` (a ``CommDebugMode`` that measures; the step's second
  iteration, after FSDP's lazy initialisation);
- a step time under the cost model of ``ucfvit/parallel/cost_model.py`` (``--cluster``).

Every option of ``recipes/train.py`` applies (the GPU recipe: bf16 compute over fp32 weights), e.g.
``--data.global-batch-size``, ``--parallel.activation-checkpointing``, ``--parallel.sequence-parallel``
and ``--arch.*``; ``--size`` is ``--model-size``. Without ``--data.global-batch-size`` the global
batch is one sample per GPU. The step runs eagerly (compiling changes kernels, not collectives; it can
lower the activation peak, so the estimate is on the high side), but ``--parallel.compile`` (on in the
GPU recipe) still decides what the trainer accepts: full checkpointing of tensor-parallel blocks cannot
be compiled in torch 2.13, so it needs ``--parallel.no-compile`` (the search skips it otherwise).

``--search`` traces every mesh of ``--nodes`` x the cluster's GPUs per node that the model allows,
with the least activation checkpointing that fits ``--budget-gib``, and lists the fastest under the
cost model. Blocks of a stack are identical, so a mesh is traced at encoder depths 3 and 4 and the
figures (all linear in depth) are extended to the real depth (``--exact`` traces the real depth;
models with UNETR's skip taps are always traced exactly). Adaptive patches (SAP,
``--arch.adaptive-patching``) cannot be traced: they pick a kernel per region size, from the data.

Prints a readable report, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore

from ucfvit.data.synthetic import SyntheticImages
from ucfvit.parallel import CommVolume, MeshShape, clip_grad_norm_, make_mesh, parallelize, parse_mesh, resolve_wrap
from ucfvit.parallel.cost_model import CLUSTERS, Cluster, dims_within_node, step_time
from ucfvit.train.cli import parse
from ucfvit.train.config import Config, ConfigError, dotted_options, read_config_file
from ucfvit.train.data_setup import input_spec
from ucfvit.train.optim import param_groups
from ucfvit.train.plan import build_checked_model
from ucfvit.train.ranges import check_ranges
from ucfvit.train.throughput import train_flops_per_sample
from ucfvit.train.trainer import accumulate_gradients

GIB = 2**30
_COMM_NUMBERS = ("count", "payload_bytes", "sent_bytes")


# --- one traced step ---------------------------------------------------------------------------------


def fake_world(world_size: int) -> None:
    """Make this process rank 0 of a ``fake`` process group of ``world_size`` ranks."""
    if dist.is_initialized():
        if dist.get_backend() != "fake":
            raise RuntimeError("simulate needs its own process: a real process group is already initialised")
        if dist.get_world_size() == world_size:
            return
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def _sample_batch(model, spec, cfg: Config, micro: int) -> dict[str, torch.Tensor]:
    """``micro`` synthetic samples shaped as the run's data."""
    shape = input_spec(model, spec)
    data = SyntheticImages(shape.img_size, shape.channels, max(2, cfg.data.num_classes), seed=cfg.run.seed)
    return data.batch(range(micro))


def _comm_rows(volume: CommVolume, phase: str) -> list[dict]:
    """The recorded collectives summed per (dims, op, issuer, group size)."""
    rows: dict[tuple, dict] = {}
    for c in volume.collectives:
        key = (phase, c.dims, c.op, c.functional, c.group_size)
        row = rows.setdefault(
            key,
            dict(
                phase=phase,
                dims=c.dims,
                op=c.op,
                functional=c.functional,
                group_size=c.group_size,
                ring_steps=c.ring_steps,
                count=0,
                payload_bytes=0,
                sent_bytes=0.0,
            ),
        )
        row["count"] += 1
        row["payload_bytes"] += c.payload_bytes
        row["sent_bytes"] += c.sent_bytes
    return list(rows.values())


def _counts(volume: CommVolume) -> dict[str, int]:
    return {str(op).split(".")[-1]: n for op, n in volume.get_comm_counts().items()}


def trace(cfg: Config) -> dict:
    """One training step of ``cfg`` (its ``mesh``) on a fake process group, traced on rank 0.

    Returns parameters, FLOPs per sample, memory (bytes) and the step's collectives (rows of
    :func:`_comm_rows`). Raises ``ValueError`` naming the option for a configuration the trainer
    would refuse.
    """
    shape = parse_mesh(cfg.mesh)
    spec, model = build_checked_model(cfg, shape)
    if getattr(model, "adaptive_patching", False):
        raise ValueError(
            f"--model {cfg.model} with adaptive patches (--arch.adaptive-patching; SAP always) cannot be traced: "
            "they pick a kernel per region size, from the data. Simulate the same options without them (--model "
            "unetr for SAP) on an image of as many patches as --arch.fixed-length"
        )
    params = sum(p.numel() for p in model.parameters())
    flops = train_flops_per_sample(model, pooled_head=spec.pooled_head)
    local = cfg.data.global_batch_size // shape.dp_size
    micro = cfg.data.micro_batch_size or local
    accum = local // micro
    fake_world(shape.world_size)
    mesh = make_mesh(shape, device_type="cpu")
    options = cfg.parallel.parallelize_options("cuda")  # the GPU recipe: bf16 over fp32
    parallelize(model, mesh, **{**options, "compile": False})  # traced eagerly
    real_batch = _sample_batch(model, spec, cfg, micro)
    device = torch.device("cpu")
    with warnings.catch_warnings(), FakeTensorMode(allow_non_fake_inputs=True) as fake:
        warnings.simplefilter("ignore")  # FSDP/autograd notes about hooks on fake modules
        model.to_empty(device=device)
        model.train()
        batch = {k: fake.from_tensor(v) for k, v in real_batch.items()}
        optimizer = torch.optim.AdamW(
            param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay),
            lr=cfg.optim.lr,
            betas=cfg.optim.betas,
            eps=cfg.optim.eps,
            foreach=False,
        )
        extra = spec.build_extra(model)

        def batches() -> Iterator[dict]:
            while True:
                yield batch

        def step(number: int) -> None:
            accumulate_gradients(model, spec, batches(), mesh, cfg, number, accum, micro, extra, device)
            clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        try:
            step(0)  # FSDP's lazy initialisation and the optimizer state
        except (DataDependentOutputException, DynamicOutputShapeException) as err:
            raise ValueError(
                f"--model {cfg.model}: its forward depends on tensor values ({err.func}), which a trace without "
                "data cannot follow"
            ) from None
        tracker = FSDPMemTracker(model, optimizer)
        tracker.track_inputs(tuple(batch.values()))
        fwd_bwd, after = CommVolume(mesh), CommVolume(mesh)
        with tracker:
            with fwd_bwd:
                accumulate_gradients(model, spec, batches(), mesh, cfg, 1, accum, micro, extra, device)
            grad_bytes = _local_bytes(p.grad for p in model.parameters() if p.grad is not None)
            with after:
                clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        peak = tracker.get_tracker_snapshot("peak")[device]
        optimizer_bytes = _local_bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    counts = _counts(fwd_bwd)
    for op, n in _counts(after).items():
        counts[op] = counts.get(op, 0) + n
    return {
        "params": params,
        "flops_per_sample": flops,
        "memory": {
            "params": _local_bytes(model.parameters()),
            "grads": grad_bytes,
            "optimizer": optimizer_bytes,
            "peak": peak["Total"],
            "peak_by_kind": {str(k).split(".")[-1].lower(): v for k, v in peak.items() if str(k) != "Total"},
        },
        "comm": _comm_rows(fwd_bwd, "forward_backward") + _comm_rows(after, "after_backward"),
        "comm_counts": counts,
    }


def _combine(a, b, t: float):
    """``a + t * (b - a)`` over equally shaped nested figures (comm rows matched by their key)."""
    if isinstance(a, dict):
        return {k: _combine(a[k], b[k], t) if k in b else a[k] for k in a}
    if isinstance(a, list):  # comm rows
        key = lambda r: (r["phase"], r["dims"], r["op"], r["functional"], r["group_size"])  # noqa: E731
        rows_b = {key(r): r for r in b}
        out = []
        for r in a:
            other = rows_b.get(key(r), {**r, **{n: 0 for n in _COMM_NUMBERS}})
            out.append({**r, **{n: r[n] + t * (other[n] - r[n]) for n in _COMM_NUMBERS}})
        return out
    if isinstance(a, bool) or not isinstance(a, (int, float)):
        return a
    return a + t * (b - a)


def trace_at_depth(cfg: Config, exact: bool = False) -> dict:
    """:func:`trace`, or (unless ``exact``) traces at encoder depths 3 and 4 extended linearly to the
    real depth: middle blocks are identical and add identical memory, FLOPs and collectives (depth 2
    has no middle block, so FSDP's prefetch buffer is missing from its peak). Models whose skip taps
    depend on the depth (UNETR) and depths below 5 are traced exactly."""
    _, model = build_checked_model(cfg, parse_mesh(cfg.mesh))
    depth = len(model.blocks)
    if exact or depth < 5 or getattr(model, "taps", ()):
        return {**trace(cfg), "traced_depths": [depth]}
    small = [copy.deepcopy(cfg) for _ in range(2)]
    for c, d in zip(small, (3, 4), strict=True):
        c.arch.depth = d
    out = _combine(trace(small[0]), trace(small[1]), depth - 3)
    out["comm_counts"] = {k: round(v) for k, v in out["comm_counts"].items()}
    for row in out["comm"]:
        row["count"] = round(row["count"])
    return {**out, "params": round(out["params"]), "traced_depths": [3, 4]}


# --- figures of one mesh -----------------------------------------------------------------------------


def figures(cfg: Config, traced: dict, cluster: Cluster) -> dict:
    """The report of one traced configuration: memory in GiB, communication per dimension, cost model."""
    shape = parse_mesh(cfg.mesh)
    world, global_batch = shape.world_size, cfg.data.global_batch_size
    recompute = 4 / 3 if cfg.parallel.activation_checkpointing == "full" else 1.0
    model_flops_per_rank = traced["flops_per_sample"] * global_batch / world
    per_block = resolve_wrap(cfg.parallel.wrap, shape.fsdp, shape.tp) == "blocks"
    cost = step_time(
        traced["comm"], model_flops_per_rank * recompute, shape, cluster, global_batch, fsdp_overlaps=per_block
    )
    cost["mfu"] = model_flops_per_rank / (cost["step_s"] * cluster.peak_tflops * 1e12)
    mem = traced["memory"]
    per_dim: dict[str, dict] = {}
    for row in traced["comm"]:
        d = per_dim.setdefault(row["dims"], {}).setdefault(row["op"], {"count": 0, "payload_gib": 0.0, "sent_gib": 0.0})
        d["count"] += row["count"]
        d["payload_gib"] += row["payload_bytes"] / GIB
        d["sent_gib"] += row["sent_bytes"] / GIB
    return {
        "mesh": str(shape),
        "world_size": world,
        "model": cfg.model,
        "size": cfg.model_size,
        "params": traced["params"],
        "global_batch": global_batch,
        "local_batch": global_batch // shape.dp_size,
        "activation_checkpointing": cfg.parallel.activation_checkpointing,
        "sequence_parallel": cfg.parallel.sequence_parallel,
        "memory_gib": {
            "params": mem["params"] / GIB,
            "grads": mem["grads"] / GIB,
            "optimizer": mem["optimizer"] / GIB,
            "activations": mem["peak_by_kind"].get("act", 0.0) / GIB,
            "peak": mem["peak"] / GIB,
            "peak_by_kind": {k: v / GIB for k, v in mem["peak_by_kind"].items()},
        },
        "comm_per_step": per_dim,
        "comm_counts": traced["comm_counts"],
        "within_node": dims_within_node(shape, cluster.gpus_per_node),
        "cluster": cluster.name,
        "cost": cost,
        "traced_depths": traced.get("traced_depths"),
    }


def report(fig: dict) -> str:
    """Readable lines for one configuration."""
    m, c = fig["memory_gib"], fig["cost"]
    peak = ", ".join(f"{k} {v:.2f}" for k, v in sorted(m["peak_by_kind"].items(), key=lambda kv: -kv[1]) if v > 0)
    lines = [
        f"{fig['model']}/{fig['size']}: {fig['params'] / 1e9:.3g} B parameters on mesh {fig['mesh']} "
        f"({fig['world_size']} ranks), global batch {fig['global_batch']} ({fig['local_batch']} per data-parallel "
        f"rank), activation checkpointing {fig['activation_checkpointing']}"
        + (", sequence parallel" if fig["sequence_parallel"] else ""),
        f"memory per rank (GiB): parameters {m['params']:.3f}, gradients {m['grads']:.3f}, optimizer "
        f"{m['optimizer']:.3f}; step peak {m['peak']:.2f} ({peak})",
        "communication per step, rank 0 (GiB; 'sent' = bytes this rank sends with ring algorithms):",
    ]
    for dim, ops in fig["comm_per_step"].items():
        where = "inside a node" if fig["within_node"].get(dim) else "between nodes"
        for op, r in ops.items():
            lines.append(
                f"  {dim:5s} {op:15s} {r['count']:6d} calls  payload {r['payload_gib']:9.3f}  "
                f"sent {r['sent_gib']:9.3f}  ({where} on {fig['cluster']})"
            )
    waited = ", ".join(f"{k} {v:.3f}" for k, v in c["waited_comm_s"].items()) or "none"
    overlapped = ", ".join(f"{k} {v:.3f}" for k, v in c["overlapped_comm_s"].items()) or "none"
    lines.append(
        f"cost model ({fig['cluster']}): compute {c['compute_s']:.3f} s, waited comm {waited} s, FSDP comm "
        f"{overlapped} s ({c['unhidden_overlap_s']:.3f} s not hidden by compute) -> step {c['step_s']:.3f} s, "
        f"{c['samples_per_s']:.1f} samples/s, MFU {c['mfu']:.1%}"
    )
    return "\n".join(lines)


# --- the search ----------------------------------------------------------------------------------------


def candidate_meshes(world_size: int) -> list[MeshShape]:
    """Every ``ddp x fsdp x tp`` factorisation of ``world_size`` with tp at most 64."""
    out = []
    for tp in (d for d in range(1, min(64, world_size) + 1) if world_size % d == 0):
        rest = world_size // tp
        out += [MeshShape(rest // f, f, tp) for f in range(1, rest + 1) if rest % f == 0]
    return out


# fp32 parameter + fp32 gradient + AdamW's two fp32 moments
_STATE_BYTES_PER_PARAM = 16


def evaluate_mesh(cfg: Config, shape: MeshShape, cluster: Cluster, budget_gib: float, exact: bool) -> dict:
    """The figures of ``shape`` with the least activation checkpointing that fits ``budget_gib``, or why
    none fits: ``{"mesh", "figures"}`` or ``{"mesh", "why"}``. Full checkpointing is tried first (if it
    does not fit, nothing does), then none and selective. Full checkpointing the trainer would refuse
    (compiled tensor-parallel blocks) is skipped."""
    base = copy.deepcopy(cfg)
    base.mesh = str(shape)
    base.parallel.sequence_parallel = cfg.parallel.sequence_parallel and shape.tp > 1
    try:
        _, model = build_checked_model(base, shape)
    except ValueError as err:
        return {"mesh": str(shape), "why": str(err)}
    states = sum(p.numel() for p in model.parameters()) * _STATE_BYTES_PER_PARAM / (shape.fsdp * shape.tp) / GIB
    if states > budget_gib:
        return {"mesh": str(shape), "why": f"weights, gradients and AdamW state alone are {states:.1f} GiB"}
    tried, refused = {}, None
    for ac in ("full", "none", "selective"):
        trial = copy.deepcopy(base)
        trial.parallel.activation_checkpointing = ac
        try:
            build_checked_model(trial, shape)
        except ValueError as err:
            refused = str(err)
            continue
        try:
            tried[ac] = figures(trial, trace_at_depth(trial, exact), cluster)
        except Exception as err:  # noqa: BLE001 (one mesh torch cannot build must not end the search)
            return {"mesh": str(shape), "why": f"the simulation failed ({type(err).__name__}: {err})"}
        fits = tried[ac]["memory_gib"]["peak"] <= budget_gib
        if ac == "full" and not fits:
            return {
                "mesh": str(shape),
                "why": f"peak {tried[ac]['memory_gib']['peak']:.1f} GiB with full checkpointing",
            }
        if ac != "full" and fits:
            return {"mesh": str(shape), "figures": tried[ac]}
    if "full" not in tried:
        peak = min(t["memory_gib"]["peak"] for t in tried.values()) if tried else float("nan")
        return {
            "mesh": str(shape),
            "why": f"peak {peak:.3g} GiB without full checkpointing, which is refused "
            f"here ({refused}); --parallel.no-compile allows it",
        }
    return {"mesh": str(shape), "figures": tried["full"]}


def _evaluate_in_worker(args: tuple) -> dict:
    config, *rest = args
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return evaluate_mesh(Config.from_dict(config), *rest)


def search(cfg: Config, cluster: Cluster, nodes: int, budget_gib: float, exact: bool, jobs: int = 1, log=print) -> dict:
    """Evaluate every candidate mesh of ``nodes`` nodes (:func:`evaluate_mesh`, in ``jobs`` processes)
    and rank those that fit by step time. Returns ``{"fits": [figures...], "rejected": [{"mesh", "why"}]}``."""
    meshes = candidate_meshes(nodes * cluster.gpus_per_node)
    work = [(cfg.to_dict(), shape, cluster, budget_gib, exact) for shape in meshes]  # a dict crosses processes
    started = time.perf_counter()
    results = []

    def note(result: dict) -> None:
        results.append(result)
        what = "fits" if "figures" in result else result["why"].splitlines()[0][:110]
        log(f"  [{len(results)}/{len(meshes)}] {result['mesh']}: {what} ({time.perf_counter() - started:.0f} s)")

    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for result in pool.map(_evaluate_in_worker, work):
                note(result)
    else:
        for args in work:
            note(_evaluate_in_worker(args))
    fits = sorted((r["figures"] for r in results if "figures" in r), key=lambda f: f["cost"]["step_s"])
    return {"fits": fits, "rejected": [r for r in results if "why" in r]}


def search_table(fits: list[dict], top: int) -> str:
    """The fastest ``top`` meshes with the cost breakdown."""
    head = (
        f"{'#':>2} {'mesh':>11} {'AC':>9} {'peak GiB':>8} {'compute s':>9} {'tp s':>7} {'fsdp s':>7} "
        f"{'ddp s':>7} {'other s':>7} {'step s':>7} {'samples/s':>9} {'MFU':>6}  tp/fsdp inside a node"
    )
    lines = [head]
    for i, f in enumerate(fits[:top], 1):
        c = f["cost"]
        comm = {**c["overlapped_comm_s"]}
        for k, v in c["waited_comm_s"].items():
            comm[k] = comm.get(k, 0.0) + v
        other = sum(v for k, v in comm.items() if k not in ("tp", "fsdp", "ddp"))
        inside = f["within_node"]
        lines.append(
            f"{i:>2} {f['mesh']:>11} {f['activation_checkpointing']:>9} {f['memory_gib']['peak']:>8.1f} "
            f"{c['compute_s']:>9.3f} {comm.get('tp', 0):>7.3f} {comm.get('fsdp', 0):>7.3f} {comm.get('ddp', 0):>7.3f} "
            f"{other:>7.3f} {c['step_s']:>7.3f} {c['samples_per_s']:>9.1f} {c['mfu']:>6.1%}  "
            f"{'yes' if inside['tp'] else 'no'}/{'yes' if inside['fsdp'] else 'no'}"
        )
    return "\n".join(lines)


# --- command line ------------------------------------------------------------------------------------


def _own_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Every option of recipes/train.py is accepted too (see recipes/train.py --help).",
    )
    p.add_argument("--size", help="the model size (--model-size)")
    p.add_argument("--cluster", choices=sorted(CLUSTERS), default="frontier", help="cost-model preset")
    p.add_argument("--search", action="store_true", help="rank every mesh of --nodes nodes")
    p.add_argument("--nodes", type=int, help="nodes of the search (GPUs = nodes x the cluster's GPUs per node)")
    p.add_argument("--top", type=int, default=10, help="meshes the search lists")
    p.add_argument("--budget-gib", type=float, help="memory per device the search allows (default: 90%% of it)")
    p.add_argument("--compute-efficiency", type=float, help="fraction of peak the matmuls reach (preset's default)")
    p.add_argument("--exact", action="store_true", help="search: trace the real depth, do not extend from 3 and 4")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="search: processes (default: every core)")
    return p


def _sets_global_batch(argv: list[str]) -> bool:
    """Whether the command line or its ``--config`` file sets the global batch."""
    if any(a.startswith(("--data.global-batch-size", "--data.global_batch_size")) for a in argv):
        return True
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    path = pre.parse_known_args(argv)[0].config
    return path is not None and "data.global_batch_size" in dotted_options(read_config_file(path))


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Config, Cluster]:
    """The simulator's own options, the training config (GPU recipe) and the cluster; ValueError on misuse."""
    own, rest = _own_parser().parse_known_args(argv)
    if own.size is not None:
        rest += ["--model-size", own.size]
    cluster = CLUSTERS[own.cluster]
    if own.compute_efficiency is not None:
        if not 0 < own.compute_efficiency <= 1:
            raise ValueError(f"--compute-efficiency={own.compute_efficiency} must be in (0, 1]")
        cluster = dataclasses.replace(cluster, compute_efficiency=own.compute_efficiency)
    mesh_given = any(a == "--mesh" or a.startswith("--mesh=") for a in rest)
    if own.search:
        if mesh_given:
            raise ValueError("--search picks the mesh: drop --mesh (the search covers every mesh of --nodes)")
        if own.nodes is None or own.nodes < 1:
            raise ValueError("--search needs --nodes N (N >= 1): the job's size, e.g. --nodes 1024")
        world = own.nodes * cluster.gpus_per_node
        rest += ["--mesh", f"1x{world}x1"]  # a placeholder; each candidate sets its own
    elif own.nodes is not None:
        raise ValueError("--nodes is the size of a --search; a single simulation takes --mesh DxFxT")
    elif not mesh_given:
        raise ValueError("give --mesh DxFxT (e.g. --mesh 16x32x8), or --search --nodes N to rank meshes")
    if own.budget_gib is not None and own.budget_gib <= 0:
        raise ValueError(f"--budget-gib={own.budget_gib} must be positive")
    if own.top < 1:
        raise ValueError(f"--top={own.top} must be at least 1")
    if own.jobs < 1:
        raise ValueError(f"--jobs={own.jobs} must be at least 1")
    cfg = parse(rest, __doc__.splitlines()[0], accelerator=True)
    shape = parse_mesh(cfg.mesh)
    if not _sets_global_batch(rest):
        cfg.data.global_batch_size = shape.world_size  # one sample per GPU
    check_ranges(cfg)
    return own, cfg, cluster


def main(argv: list[str] | None = None) -> int:
    try:
        own, cfg, cluster = parse_args(sys.argv[1:] if argv is None else argv)
        budget = own.budget_gib if own.budget_gib is not None else 0.9 * cluster.memory_gib
        started = time.perf_counter()
        if own.search:
            print(
                f"search: {cfg.model}/{cfg.model_size} on {own.nodes} {cluster.name} nodes "
                f"({own.nodes * cluster.gpus_per_node} devices), global batch {cfg.data.global_batch_size}, "
                f"budget {budget:.1f} GiB per device",
                flush=True,
            )
            found = search(cfg, cluster, own.nodes, budget, own.exact, own.jobs, log=lambda s: print(s, flush=True))
            print(search_table(found["fits"], own.top))
            print(
                f"{len(found['fits'])} meshes fit, {len(found['rejected'])} do not "
                f"({time.perf_counter() - started:.0f} s)"
            )
            record = {
                "search": found["fits"][: own.top],
                "fitting": len(found["fits"]),
                "rejected": found["rejected"],
                "budget_gib": budget,
                "nodes": own.nodes,
                "seconds": time.perf_counter() - started,
            }
        else:
            traced = trace(cfg)
            record = figures(cfg, traced, cluster)
            record["seconds"] = time.perf_counter() - started
            print(report(record))
        print(json.dumps(record, default=float))
        return 0
    except (ValueError, ConfigError) as err:
        print(f"simulate.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
