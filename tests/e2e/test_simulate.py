"""benchmarks/simulate.py: a training step traced on a fake mesh, checked against FSDP's allocation,
a real gloo step and the full-depth trace; its search and its command line. The functions the ranks
run are beside their tests (benchmarks/ is importable there); the cost model's arithmetic:
tests/unit/test_cost_model.py."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor.debug import CommDebugMode

from rank_runner import run_ranks
from ucfvit.data.synthetic import SyntheticImages
from ucfvit.parallel import CommVolume, clip_grad_norm_, local_batch_range, make_mesh, parallelize, parse_mesh
from ucfvit.train.optim import build_optimizer
from ucfvit.train.plan import build_checked_model
from ucfvit.train.trainer import accumulate_gradients

ROOT = Path(__file__).resolve().parents[2]
SIMULATE = ROOT / "benchmarks" / "simulate.py"
DEBUG = ["--model", "vit", "--size", "debug", "--arch.img-size", "32", "32", "--arch.patch-size", "4"]


def simulate_cli(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SIMULATE), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )


def fsdp_allocation(argv: list[str]) -> dict:
    """What ``fully_shard`` allocates on rank 0 for the parameters: each FSDP parameter's padded
    local shard (``FSDPParam._sharded_param_data``), summed; the model built as the simulator does."""
    from benchmarks.simulate import fake_world, parse_args

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


def test_giant_on_4096_ranks_reports_what_fully_shard_allocates():
    """The issue's command: ViT-g/14 on 16x32x8; parameters and AdamW state per rank within 1% of
    FSDP's own padded shards (the optimizer holds two fp32 moments of each)."""
    done = simulate_cli("--model", "vit", "--size", "giant", "--mesh", "16x32x8")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["mesh"] == "16x32x8" and report["world_size"] == 4096 and report["params"] > 1e9
    fsdp = run_ranks(1, fsdp_allocation, ["--model", "vit", "--size", "giant", "--mesh", "16x32x8"])[0]
    assert fsdp["fsdp_params"] == fsdp["model_params"]  # every parameter is FSDP's
    params = report["memory_gib"]["params"] * 2**30
    assert abs(params - fsdp["bytes"]) / fsdp["bytes"] < 0.01, (params, fsdp)
    assert abs(report["memory_gib"]["optimizer"] * 2**30 - 2 * fsdp["bytes"]) / (2 * fsdp["bytes"]) < 0.01
    assert report["memory_gib"]["grads"] == report["memory_gib"]["params"]
    # ~1/(fsdp*tp) of the fp32 weights per rank
    ideal = report["params"] * 4 / (32 * 8) / 2**30
    assert abs(report["memory_gib"]["params"] - ideal) / ideal < 0.05
    comm = report["comm_per_step"]
    assert set(comm) == {"tp", "fsdp", "ddp"} and report["memory_gib"]["peak"] > report["memory_gib"]["activations"] > 0
    assert "step peak" in done.stdout and "cost model (frontier)" in done.stdout


MAE_DEBUG = ["--model", "mae", "--size", "debug", "--arch.img-size", "32", "32", "--arch.patch-size", "4"]
SP_AC = ["--parallel.sequence-parallel", "--parallel.activation-checkpointing", "selective"]
STEPS = [
    [*DEBUG, "--mesh", "2x2x2", "--data.global-batch-size", "8"],
    [*DEBUG, "--mesh", "2x2x2", "--data.global-batch-size", "8", *SP_AC],
    [*MAE_DEBUG, "--mesh", "2x2x2", "--data.global-batch-size", "8"],
]


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


def simulated_steps(argvs: list[list[str]]) -> list[dict]:
    """``benchmarks/simulate.py``'s traced step for each command line (fake process group)."""
    from benchmarks.simulate import parse_args, trace

    out = []
    for argv in argvs:
        _, cfg, _ = parse_args(argv)
        t = trace(cfg)
        out.append({"counts": t["comm_counts"], "totals": _totals(t["comm"]), "rows": t["comm"]})
    return out


def real_steps(argvs: list[list[str]]) -> list[dict]:
    """The same step for real on gloo ranks: the trainer's optimizer, real tensors, real collectives;
    counted by a plain CommDebugMode and measured by CommVolume."""
    torch.set_num_threads(1)
    return [_real_step(argv) for argv in argvs]


def _real_step(argv: list[str]) -> dict:
    from benchmarks.simulate import parse_args

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
        "counts": counts,
        "totals": _totals(measured),
        "local_batch": len(rows),
        "tokens": tokens,
        "embed_dim": model.embed_dim,
        "depth": len(model.blocks),
    }


def test_communication_equals_a_real_8_rank_gloo_step():
    """Calls per collective (CommDebugMode) and bytes per mesh dimension and collective: the fake-mesh
    trace equals the real step exactly; tp all-reduce payload is Megatron's 2 per block each way of
    the (local batch, tokens, width) activations in bf16."""
    fake = run_ranks(1, simulated_steps, STEPS, timeout=300)[0]
    real = run_ranks(8, real_steps, STEPS, timeout=600)
    for r in real[1:]:  # every rank sees the same collectives
        assert [x["counts"] for x in r] == [x["counts"] for x in real[0]]
    for f, r in zip(fake, real[0], strict=True):
        assert f["counts"] == r["counts"]
        assert f["totals"] == r["totals"]
    plain = real[0][0]
    tp_fwd_bwd = [row for row in fake[0]["rows"] if row["dims"] == "tp" and row["functional"]]
    assert [(row["op"], row["count"]) for row in tp_fwd_bwd] == [("all_reduce", 4 * plain["depth"])]
    activation = plain["local_batch"] * plain["tokens"] * plain["embed_dim"] * 2
    assert tp_fwd_bwd[0]["payload_bytes"] == 4 * plain["depth"] * activation
    assert tp_fwd_bwd[0]["sent_bytes"] == pytest.approx(2 * (2 - 1) / 2 * tp_fwd_bwd[0]["payload_bytes"])


def extrapolated_and_exact(argv: list[str]) -> dict:
    """:func:`trace_at_depth` extended from depths 3 and 4, and the real depth traced."""
    from benchmarks.simulate import parse_args, trace_at_depth

    _, cfg, _ = parse_args(argv)
    return {"extended": trace_at_depth(cfg), "exact": trace_at_depth(cfg, exact=True)}


def test_extending_from_depths_3_and_4_equals_tracing_the_real_depth():
    argv = DEBUG + ["--arch.depth", "7", "--mesh", "2x2x2", "--data.global-batch-size", "8"]
    r = run_ranks(1, extrapolated_and_exact, argv, timeout=300)[0]
    ext, exact = r["extended"], r["exact"]
    assert ext["traced_depths"] == [3, 4] and exact["traced_depths"] == [7]
    assert ext["params"] == exact["params"] and ext["comm_counts"] == exact["comm_counts"]
    for name in ("params", "grads", "optimizer"):
        assert ext["memory"][name] == pytest.approx(exact["memory"][name], rel=1e-9)
    assert ext["memory"]["peak"] == pytest.approx(exact["memory"]["peak"], rel=0.01)
    key = lambda row: (row["phase"], row["dims"], row["op"], row["functional"])  # noqa: E731
    assert sorted(map(key, ext["comm"])) == sorted(map(key, exact["comm"]))
    exact_rows = {key(row): row for row in exact["comm"]}
    for row in ext["comm"]:
        assert row["count"] == exact_rows[key(row)]["count"]
        assert row["payload_bytes"] == pytest.approx(exact_rows[key(row)]["payload_bytes"], rel=1e-9)


def test_search_ranks_meshes_that_fit_the_budget():
    search = ["--search", "--cluster", "dgx-h100", "--nodes", "2", "--top", "4", "--jobs", "1", "--budget-gib", "0.01"]
    done = simulate_cli(*DEBUG, *search, "--data.global-batch-size", "64")
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    fits, rejected = record["search"], record["rejected"]
    assert 1 <= len(fits) <= 4 and record["fitting"] + len(rejected) == len(
        [1 for tp in (1, 2, 4, 8, 16) for f in range(1, 16 // tp + 1) if (16 // tp) % f == 0]
    )
    steps = [f["cost"]["step_s"] for f in fits]
    assert steps == sorted(steps)
    assert all(f["memory_gib"]["peak"] <= 0.01 and f["world_size"] == 16 for f in fits)
    assert all(r["why"] for r in rejected)
    assert all("other" not in f["comm_per_step"] for f in fits)  # groups of every mesh named by their dimension
    table = done.stdout.split("tp/fsdp inside a node")[1]
    assert fits[0]["mesh"] in table and "meshes fit" in done.stdout


def checkpointing_choices(argv: list[str], mesh: str) -> dict:
    """What the search picks for ``mesh`` at budgets between the peaks of its checkpointing modes, with
    the GPU recipe's compile and with ``--parallel.no-compile``."""
    from benchmarks.simulate import evaluate_mesh, parse_args, trace

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


def test_search_skips_full_checkpointing_the_compiling_trainer_would_refuse():
    # 2x2x2 at a budget only full checkpointing fits: with the GPU recipe's compile the mesh is rejected
    # with the way out; with --parallel.no-compile it fits with full checkpointing
    argv = [*DEBUG, "--data.global-batch-size", "64"]
    got = run_ranks(1, checkpointing_choices, argv, "2x2x2", timeout=300)[0]
    assert got["peaks"]["full"] < min(got["peaks"]["none"], got["peaks"]["selective"]), got["peaks"]
    assert "figures" not in got["compiled"] and "--parallel.no-compile allows it" in got["compiled"]["why"], got
    assert got["eager"]["figures"]["activation_checkpointing"] == "full", got["eager"]


CARELESS = [
    (["--mesh", "2x2x2", "--search", "--nodes", "1"], "--search picks the mesh"),
    (["--search"], "--search needs --nodes"),
    ([], "give --mesh"),
    (["--mesh", "2x2x2", "--nodes", "2"], "--nodes is the size of a --search"),
    (["--mesh", "1x1x3"], "tp=3"),
    (["--mesh", "2x2x2", "--data.global-batch-size", "6"], "--data.global-batch-size=6"),
    (["--mesh", "2x2x2", "--budget-gib", "-1"], "--budget-gib"),
    (["--mesh", "2x2x2", "--compute-efficiency", "2"], "--compute-efficiency"),
    (["--mesh", "2x2x2", "--optim.lr", "-1"], "--optim.lr"),
    (["--mesh", "2x2x2", "--model", "sap"], "--arch.adaptive-patching"),
    # the GPU recipe compiles, and torch 2.13 cannot compile fully checkpointed tensor-parallel blocks
    (["--mesh", "1x1x2", "--parallel.activation-checkpointing", "full"], "with compile=True and tp > 1"),
    (["--mesh", "2x2x2", "--arch.adaptive-patching", "True", "--arch.fixed-length", "46"], "cannot be traced"),
]


def careless(cases: list) -> list[str]:
    """``main`` on each command line: its exit code and what it printed on stderr."""
    import contextlib
    import io

    from benchmarks.simulate import main

    out = []
    for argv, _ in cases:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(DEBUG + argv)
        out.append(f"{code}|{err.getvalue()}")
    return out


def test_careless_command_lines_are_one_line_errors():
    for (argv, says), got in zip(CARELESS, run_ranks(1, careless, CARELESS)[0], strict=True):
        code, message = got.split("|", 1)
        assert code == "2" and says in message and message.count("\n") == 1, (argv, message)


def global_batches(config: str) -> list[int]:
    """The global batch ``parse_args`` resolves: default, from a flag, from a --config file."""
    from benchmarks.simulate import parse_args

    argvs = [[], ["--data.global-batch-size", "32"], ["--config", config]]
    return [parse_args(DEBUG + ["--mesh", "2x2x2", *argv])[1].data.global_batch_size for argv in argvs]


def test_global_batch_comes_from_the_command_line_or_the_config_file(tmp_path):
    """One sample per GPU only when neither the flags nor a --config file set it."""
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": "vit", "data": {"global_batch_size": 64}}))
    assert run_ranks(1, global_batches, str(config))[0] == [8, 32, 64]


def test_a_15b_vit_on_4096_ranks_holds_its_share_of_the_weights():
    """What the removed memory_per_rank test checked: each rank of 16x32x8 holds ~1/(fsdp*tp) of a
    15.1B ViT's fp32 weights (FSDP's padded shards)."""
    shape = ["--arch.embed-dim", "5120", "--arch.depth", "48", "--arch.num-heads", "40"]
    argv = ["--model", "vit", "--size", "huge", "--mesh", "16x32x8", *shape]
    r = run_ranks(1, fsdp_allocation, argv)[0]
    assert r["numel"] > 15e9 and r["fsdp_params"] == r["model_params"]
    ideal = r["numel"] * 4 / (32 * 8)
    assert abs(r["bytes"] - ideal) / ideal < 0.05, r
