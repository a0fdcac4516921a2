"""parallelize() on every mesh layout matches a single-process reference run (CPU, gloo).

For every family (debug size, fp32, MAE masking and drop path active), one reference state dict
is loaded into every layout; the parallel run sees the same global batch split over
data-parallel ranks. Compared: the step-1 loss and every gradient (max abs diff <=
1e-5 * max(1, max|ref|)) and every parameter after 3 AdamW steps (lr 1e-3, eps 1e-6,
weight decay 0.05; max abs diff <= 1e-4). With bf16 parameters (fp32 master weights and
reductions) the tolerances are 3e-2 (loss, gradients) and 2e-2 (parameters): bf16 keeps 8
mantissa bits, so 3 steps of forward/backward rounding give differences of about 1e-2.
The same holds for every encoder option at once and for adaptive patch sequences. The ranks run
tests/parity.py.
"""

from __future__ import annotations

import pytest

from conftest import FAMILIES
from parity import parity, parity_jobs
from rank_runner import run_ranks

FP32 = {"loss": 1e-5, "grad": 1e-5, "param": 1e-4}
BF16 = {"loss": 3e-2, "grad": 3e-2, "param": 2e-2}

CASES = {
    1: [
        {"mesh": "1x1x1"},
        {"mesh": "1x1x1", "accum": 2},
        {"mesh": "1x1x1", "bf16": True},
        # whole-model compile (wrap="auto" on a mesh that shards nothing) around checkpointed blocks
        {"mesh": "1x1x1", "compile": "aot_eager", "ac": "selective"},
    ],
    2: [
        {"mesh": "2x1x1"},
        {"mesh": "1x2x1"},
        {"mesh": "1x1x2"},
        {"mesh": "1x1x2", "sp": True},
        {"mesh": "1x2x1", "ac": "full"},
        {"mesh": "1x1x2", "sp": True, "ac": "selective"},
        {"mesh": "2x1x1", "accum": 2},
        {"mesh": "1x2x1", "bf16": True},
        # torch.compile per block (aot_eager: the graph capture and AOT autograd of inductor,
        # without generating C++ on a CPU runner) with TP, sequence parallel and selective AC.
        {"mesh": "1x1x2", "sp": True, "ac": "selective", "compile": "aot_eager"},
        # the root as the only FSDP unit: whole-model compile on pure replication (wrap="auto")
        {"mesh": "2x1x1", "compile": "aot_eager"},
    ],
    8: [
        {"mesh": "2x2x2"},
        {"mesh": "2x2x2", "sp": True, "ac": "full", "accum": 2},
    ],
}
SLOW_CASES = {
    4: [
        {"mesh": "2x2x1"},
        {"mesh": "1x2x2"},
        {"mesh": "2x1x2"},
        {"mesh": "1x2x2", "sp": True, "ac": "full"},
    ],
    8: [{"mesh": "2x2x2", "bf16": True, "ac": "selective"}],
}


# Every option of the encoder at once (and ViT's pooling/patch dropout), with all dropouts active:
# masks are drawn at global sizes and sliced per tp rank, so the runs must match one process.
ENCODER_OPTIONS = {
    "qk_norm": True,
    "init_values": 0.1,
    "attn_drop_rate": 0.1,
    "proj_drop_rate": 0.1,
    "pos_drop_rate": 0.1,
    "pos_embed": "learned_sincos",
}
OPTIONS = {
    "vit": {**ENCODER_OPTIONS, "global_pool": "avg", "class_token": True, "patch_drop_rate": 0.25},
    "mae": ENCODER_OPTIONS,
}
OPTION_CASES = {
    1: [{"mesh": "1x1x1"}],
    2: [
        {"mesh": "1x1x2", "sp": True, "ac": "selective", "compile": "aot_eager"},
        # the root as the only FSDP unit by choice (wrap="model"): on FSDP, and whole-model compile on
        # tensor parallel with sequence parallelism
        {"mesh": "1x2x1", "wrap": "model", "bf16": True},
        {"mesh": "1x1x2", "sp": True, "ac": "selective", "compile": "aot_eager", "wrap": "model"},
    ],
    8: [{"mesh": "2x2x2"}, {"mesh": "2x2x2", "sp": True}],
}


def check(results: list[dict]) -> None:
    assert results, "rank 0 reported nothing"
    for r in results:
        tol = BF16 if r.get("bf16") else FP32
        label = {k: v for k, v in r.items() if k in ("mesh", "sp", "ac", "bf16", "accum", "compile", "wrap", "model")}
        assert r["same_names"], f"{label}: parameter names differ from the unparallelized model"
        assert r["loss_diff"] <= tol["loss"], f"{label}: loss differs by {r['loss_diff']:.2e}"
        assert r["grad_diff"] <= tol["grad"], f"{label}: gradient of {r['grad_name']} differs by {r['grad_diff']:.2e}"
        assert r["param_diff"] <= tol["param"], (
            f"{label}: parameter {r['param_name']} differs by {r['param_diff']:.2e} after 3 steps"
        )


@pytest.mark.parametrize("world", sorted(CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_parity(family, world):
    check(run_ranks(world, parity, family, CASES[world], timeout=400)[0])


@pytest.mark.slow
@pytest.mark.parametrize("world", sorted(SLOW_CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_parity_more_meshes(family, world):
    check(run_ranks(world, parity, family, SLOW_CASES[world], timeout=400)[0])


@pytest.mark.parametrize("world", sorted(OPTION_CASES))
def test_parity_with_every_new_option(world):
    jobs = [
        {"family": family, "cases": OPTION_CASES[world], "overrides": options} for family, options in OPTIONS.items()
    ]
    results = run_ranks(world, parity_jobs, jobs, timeout=500)[0]
    assert len(results) == len(OPTIONS)
    for family_results in results:
        check(family_results)


# Adaptive patch sequences: quadtree-like regions with pad tokens among them (tests/adaptive_inputs.py).
ADAPTIVE = {"adaptive_patching": True, "fixed_length": 16}
QUADTREE = "adaptive_inputs:quadtree"


ADAPTIVE_3D = {"adaptive_patching": True, "fixed_length": 64, "img_size": [8, 8, 8], "patch_size": 2}


MESHES = {
    1: [{"mesh": "1x1x1"}],
    2: [{"mesh": "1x1x2"}, {"mesh": "1x1x2", "sp": True, "ac": "selective"}, {"mesh": "1x2x1", "ac": "full"}],
    8: [{"mesh": "2x2x2"}],  # every mesh dimension at once; 2D jobs only (CI time)
}


def _jobs(world: int) -> list[dict]:
    cases = MESHES[world]
    jobs = [{"family": f, "cases": cases, "overrides": ADAPTIVE, "inputs": QUADTREE} for f in FAMILIES]
    jobs += [
        {
            "family": "vit",
            "cases": cases,
            "overrides": {**ADAPTIVE, "class_token": False, "use_adaptive_pos_emb": True},
        },
        {"family": "mae", "cases": cases, "overrides": {**ADAPTIVE, "use_adaptive_pos_emb": True, "rope": True}},
    ]
    if world < 8:
        jobs += [{"family": f, "cases": cases, "overrides": ADAPTIVE_3D} for f in ("mae", "unetr", "sap")]
    for job in jobs:
        job["inputs"] = QUADTREE
    if world == 2:  # compile (aot_eager) with TP, sequence parallel and selective AC: the mask is a block input
        compiled = [{"mesh": "1x1x2", "sp": True, "ac": "selective", "compile": "aot_eager"}]
        jobs.append({"family": "vit", "cases": compiled, "overrides": ADAPTIVE, "inputs": QUADTREE})
    return jobs


@pytest.mark.parametrize("world", sorted(MESHES))
def test_adaptive_training_matches_one_process(world):
    jobs = _jobs(world)
    results = run_ranks(world, parity_jobs, jobs, timeout=500)[0]
    assert len(results) == len(jobs)
    for job, result in zip(jobs, results, strict=True):
        try:
            check(result)
        except AssertionError as err:
            raise AssertionError(f"{job['family']} {job['overrides']}: {err}") from None
