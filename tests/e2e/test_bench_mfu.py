"""benchmarks/mfu.py at debug sizes on this CPU: every variant runs and reports, the ratios are those of
the measured rates, FLOPs agree with the analytic count, careless input fails in one line.

timm cannot be installed here (it needs torchvision, which has no CPU build), so a stand-in module
records what the harness asks timm for and answers with a ViT of that shape."""

from __future__ import annotations

import math

import pytest
import torch

import benchmark_runs
from rank_runner import run_ranks
from ucfvit.models import build_model
from ucfvit.train.throughput import train_flops_per_sample

pytestmark = pytest.mark.xdist_group("bench_mfu")  # its module fixture runs once, in one test process

FAST = ["--steps", "1", "--warmup", "1", "--backend", "aot_eager"]


@pytest.fixture(scope="module")
def report():
    argv = ["--cases", "vit-l16", "mae-l16", "unetr-b16-3d", "--compare", "timm", "--profile", *FAST]
    return run_ranks(1, benchmark_runs.mfu, argv, True, timeout=600)[0]


def test_every_case_runs_the_production_path_its_ceiling_and_timm(report):
    assert report["code"] == 0, report["stderr"]
    got = [(r["case"], r["variant"]) for r in report["records"]]
    assert got == [
        ("vit-l16", "ceiling"),
        ("vit-l16", "timm"),
        ("vit-l16", "ucfvit"),
        ("mae-l16", "ceiling"),
        ("mae-l16", "ucfvit"),
        ("unetr-b16-3d", "ceiling"),
        ("unetr-b16-3d", "ucfvit"),
    ]
    for r in report["records"]:
        assert r["img_per_s"] > 0 and r["step_ms"] > 0 and r["flops_per_step"] > 0, r
        assert math.isclose(r["img_per_s"], r["batch"] * 1e3 / r["step_ms"]), r
        assert math.isclose(r["tflops"], r["flops_per_step"] / (r["step_ms"] / 1e3) / 1e12), r
        assert r["mfu"] is None and r["device"] == "cpu"  # no peak figure for a CPU
        assert r["graph_breaks"] == 0 and not r["recompiled_while_timed"], r
        assert len(r["top_kernels"]) == 10 and sum(k["share"] for k in r["top_kernels"]) <= 1 + 1e-9, r
        # SDPA on this CPU dispatches to its flash kernel (on a GPU: flash or cuDNN, to be read off here)
        assert "aten::_scaled_dot_product_flash_attention_for_cpu" in r["attention_ops"], r["attention_ops"]
    ours = {r["case"]: r for r in report["records"] if r["variant"] == "ucfvit"}
    rate = {(r["case"], r["variant"]): r["img_per_s"] for r in report["records"]}
    assert math.isclose(ours["vit-l16"]["vs_ceiling"], rate["vit-l16", "ucfvit"] / rate["vit-l16", "ceiling"])
    assert math.isclose(
        ours["vit-l16"]["vs_timm_autocast_compiled"], rate["vit-l16", "ucfvit"] / rate["vit-l16", "timm"]
    )
    assert ours["mae-l16"]["vs_timm_autocast_compiled"] is None  # timm has no MAE
    # the production path: the GPU recipe's bf16 compute over fp32 master weights, compiled as wrap picks
    assert ours["mae-l16"]["settings"] | {"compile": None} == {
        "param_dtype": "bfloat16",
        "master_weights": "float32",
        "compile": None,
        "wrap": "auto",
        "ac": "none",
        "fused_adamw": False,
        "grad_clip": 1.0,
    }
    assert ours["mae-l16"]["settings"]["compile"] == "aot_eager"


def test_timm_is_asked_for_its_model_of_the_case(report):
    assert report["timm_calls"][-1] == {
        "name": "vit_large_patch16_224",
        "pretrained": False,
        "img_size": 32,
        "patch_size": 4,
        "in_chans": 3,
        "num_classes": 1000,
        "embed_dim": 64,
        "depth": 2,
        "num_heads": 8,
    }


def test_flops_agree_with_the_analytic_count(report):
    # FlopCounterMode counts what runs; the analytic count (ucfvit.train.throughput) the matmuls, 3x forward
    # (the patch embedding's input gradient, which is not computed, makes the difference)
    ours = {r["case"]: r for r in report["records"] if r["variant"] == "ucfvit"}
    for case, family, arch in [("vit-l16", "vit", {}), ("mae-l16", "mae", {"mask_ratio": 0.75})]:
        with torch.device("meta"):
            model = build_model(family, "debug", img_size=(32, 32), patch_size=4, **arch)
        expected = train_flops_per_sample(model, pooled_head=family == "vit") * ours[case]["batch"]
        assert abs(ours[case]["flops_per_step"] / expected - 1) < 0.05, (case, ours[case]["flops_per_step"], expected)


def test_a_batch_that_does_not_fit_is_reported_not_fatal():
    got = run_ranks(1, benchmark_runs.mfu, ["--cases", "vit-b16", *FAST], kwargs={"oom": "production"}, timeout=300)[0]
    assert got["code"] == 0, got["stderr"]
    ceiling, ours = got["records"]
    assert ours["oom"] is True and "img_per_s" not in ours and ours["vs_ceiling"] is None
    assert ceiling["img_per_s"] > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cases", "vit-x"], r"--cases vit-x: unknown; choose from vit-b16"),
        (["--batch", "0"], r"--batch 0: batch sizes must be positive"),
        (["--steps", "0"], r"--steps 0 --warmup 5: both must be at least 1"),
        (["--model", "mae"], r"--model is set by the case"),
        (["--arch.img-size=64", "64"], r"--arch.img-size is set by the case"),
        (["--parallel.wrap", "sideways"], r"--parallel.wrap"),
        (["--cases", "vit-b16", "--compare", "timm", *FAST], r"--compare timm needs timm: pip install timm"),
    ],
)
def test_careless_input_is_one_line(argv, message):
    import re

    got = run_ranks(1, benchmark_runs.mfu, argv, timeout=300)[0]
    assert got["code"] == 2 and re.search(message, got["stderr"]), got["stderr"]
    assert "Traceback" not in got["stderr"]
