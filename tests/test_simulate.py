"""benchmarks/simulate.py: a training step traced on a fake mesh, checked against FSDP's allocation,
a real gloo step, the full-depth trace, and the cost model's arithmetic; its command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import run_ranks
from ucfvit.parallel import MeshShape
from ucfvit.parallel.cost_model import CLUSTERS, collective_seconds, dims_within_node, step_time

ROOT = Path(__file__).resolve().parents[1]
SIMULATE = ROOT / "benchmarks" / "simulate.py"
DEBUG = ["--model", "vit", "--size", "debug", "--arch.img-size", "32", "32", "--arch.patch-size", "4"]


def simulate_cli(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SIMULATE), *argv], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def test_giant_on_4096_ranks_reports_what_fully_shard_allocates():
    """The issue's command: ViT-g/14 on 16x32x8; parameters and AdamW state per rank within 1% of
    FSDP's own padded shards (the optimizer holds two fp32 moments of each)."""
    done = simulate_cli("--model", "vit", "--size", "giant", "--mesh", "16x32x8")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["mesh"] == "16x32x8" and report["world_size"] == 4096 and report["params"] > 1e9
    fsdp = run_ranks(1, "simulate_cases:fsdp_allocation", ["--model", "vit", "--size", "giant", "--mesh", "16x32x8"])[0]
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


STEPS = [
    DEBUG + ["--mesh", "2x2x2", "--data.global-batch-size", "8"],
    DEBUG + ["--mesh", "2x2x2", "--data.global-batch-size", "8", "--parallel.sequence-parallel",
             "--parallel.activation-checkpointing", "selective"],
    ["--model", "mae", "--size", "debug", "--arch.img-size", "32", "32", "--arch.patch-size", "4", "--mesh", "2x2x2",
     "--data.global-batch-size", "8"],
]  # fmt: skip


def test_communication_equals_a_real_8_rank_gloo_step():
    """Calls per collective (CommDebugMode) and bytes per mesh dimension and collective: the fake-mesh
    trace equals the real step exactly; tp all-reduce payload is Megatron's 2 per block each way of
    the (local batch, tokens, width) activations in bf16."""
    fake = run_ranks(1, "simulate_cases:simulated", STEPS, timeout=300)[0]
    real = run_ranks(8, "simulate_cases:real", STEPS, timeout=600)
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


def test_extending_from_depths_3_and_4_equals_tracing_the_real_depth():
    argv = DEBUG + ["--arch.depth", "7", "--mesh", "2x2x2", "--data.global-batch-size", "8"]
    r = run_ranks(1, "simulate_cases:extrapolated_and_exact", argv, timeout=300)[0]
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


def test_groups_inside_a_node():
    assert dims_within_node(MeshShape(2, 4, 8), 8) == {"ddp": False, "fsdp": False, "tp": True, "world": False}
    assert dims_within_node(MeshShape(4, 2, 4), 8) == {"ddp": False, "fsdp": True, "tp": True, "world": False}
    assert dims_within_node(MeshShape(1, 8, 1), 8) == {"ddp": True, "fsdp": True, "tp": True, "world": True}
    # tp=16 crosses nodes of 8; tp=3 does not divide 8, so some groups straddle two nodes
    assert dims_within_node(MeshShape(1, 1, 16), 8)["tp"] is False
    assert dims_within_node(MeshShape(1, 4, 3), 8)["tp"] is False  # ranks 6, 7 | 8


def test_cost_model_arithmetic():
    frontier = CLUSTERS["frontier"]
    shape = MeshShape(2, 4, 8)  # tp inside a node, fsdp between nodes
    tp = dict(phase="forward_backward", dims="tp", op="all_reduce", functional=True, group_size=8,
              ring_steps=14, count=10, sent_bytes=50e9)  # fmt: skip
    fsdp = dict(phase="forward_backward", dims="fsdp", op="all_gather", functional=False, group_size=4,
                ring_steps=3, count=2, sent_bytes=12.5e9)  # fmt: skip
    assert collective_seconds(tp, shape, frontier) == pytest.approx(10 * 14 * 5e-6 + 1.0)  # 50 GB/s inside
    assert collective_seconds(fsdp, shape, frontier) == pytest.approx(2 * 3 * 10e-6 + 1.0)  # 12.5 GB/s between
    pair = {**tp, "group_size": 2, "ring_steps": 2}
    assert collective_seconds(pair, MeshShape(8, 4, 2), frontier) == pytest.approx(10 * 2 * 5e-6 + 0.25)  # one MI250X
    flops = 0.5 * 191.5e12 * 0.40  # half a second of compute
    t = step_time([tp, fsdp], flops, shape, frontier, global_batch=64)
    # tp is waited for, fsdp (1.00006 s) overlaps the 0.5 s of compute and shows only beyond it
    assert t["compute_s"] == pytest.approx(0.5)
    assert t["step_s"] == pytest.approx(0.5 + (10 * 14 * 5e-6 + 1.0) + (2 * 3 * 10e-6 + 1.0 - 0.5))
    assert t["samples_per_s"] == pytest.approx(64 / t["step_s"])
    # the root as the only FSDP unit (wrap="model"): its collectives come before forward and after
    # backward, so they are waited for in full
    whole = step_time([tp, fsdp], flops, shape, frontier, global_batch=64, fsdp_overlaps=False)
    assert whole["step_s"] == pytest.approx(0.5 + (10 * 14 * 5e-6 + 1.0) + (2 * 3 * 10e-6 + 1.0))


def test_search_ranks_meshes_that_fit_the_budget():
    done = simulate_cli(
        *DEBUG, "--search", "--cluster", "dgx-h100", "--nodes", "2", "--top", "4", "--jobs", "1",
        "--budget-gib", "0.01", "--data.global-batch-size", "64",
    )  # fmt: skip
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


def test_search_skips_full_checkpointing_the_compiling_trainer_would_refuse():
    # 2x2x2 at a budget only full checkpointing fits: with the GPU recipe's compile the mesh is rejected
    # with the way out; with --parallel.no-compile it fits with full checkpointing
    argv = [*DEBUG, "--data.global-batch-size", "64"]
    got = run_ranks(1, "simulate_cases:checkpointing_choices", argv, "2x2x2", timeout=300)[0]
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
    for (argv, says), got in zip(CARELESS, run_ranks(1, "test_simulate:careless", CARELESS)[0], strict=True):
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
    assert run_ranks(1, "test_simulate:global_batches", str(config))[0] == [8, 32, 64]


def test_a_15b_vit_on_4096_ranks_holds_its_share_of_the_weights():
    """What the removed memory_per_rank test checked: each rank of 16x32x8 holds ~1/(fsdp*tp) of a
    15.1B ViT's fp32 weights (FSDP's padded shards)."""
    argv = ["--model", "vit", "--size", "huge", "--mesh", "16x32x8",
            "--arch.embed-dim", "5120", "--arch.depth", "48", "--arch.num-heads", "40"]  # fmt: skip
    r = run_ranks(1, "simulate_cases:fsdp_allocation", argv)[0]
    assert r["numel"] > 15e9 and r["fsdp_params"] == r["model_params"]
    ideal = r["numel"] * 4 / (32 * 8)
    assert abs(r["bytes"] - ideal) / ideal < 0.05, r
