"""benchmarks/bf16_curve.py on this CPU: the debug ViT trained 60 steps in fp32 and in bf16 compute
(fp32 master weights both) follows the same loss curve.

Tolerance: the curves smoothed over 10 steps stay within 3% of each other (measured: 0.4%). bf16 keeps
8 mantissa bits, so a single step's loss differs by about 1e-2 relative, and the two runs drift apart
slowly as their weights do; a run that learns (the loss falls to under half) makes the check bite.
The run is seed 1: at lr 2e-3 on 16 samples a step, the debug ViT's loss jumps at some seeds (0 and 3:
curves 34% and 16% apart), and there the two runs' small rounding differences grow fast."""

from __future__ import annotations

import pytest

from distributed import run_ranks


def test_bf16_compute_follows_the_fp32_loss_curve(tmp_path):
    argv = ["--steps", "60", "--run-dir", str(tmp_path), "--run.seed", "1"]
    got = run_ranks(1, "bench_cases:bf16_curve", argv, timeout=300)[0]
    assert got["code"] == 0, got["stderr"]
    [r] = got["records"]
    assert r["param_dtypes"] == {"float32": "float32", "bfloat16": "bfloat16"}
    assert r["fp32_last"] < 0.5 * r["fp32_first"] and r["bf16_last"] < 0.5 * r["bf16_first"], r
    assert r["max_rel_gap"] <= 0.03, r
    assert (tmp_path / "bfloat16" / "metrics.jsonl").exists() and (tmp_path / "float32" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "10"], "must be at least twice --window 10"),
        (["--run-dir", "{tmp}/file"], "{tmp}/file is not a directory; pick a new --run-dir"),
        (["--run-dir", "{tmp}"], "{tmp} holds {tmp}/float32; pick a new --run-dir"),
    ],
)
def test_careless_input_is_one_line(tmp_path, argv, message):
    (tmp_path / "file").write_text("mine")
    (tmp_path / "float32").mkdir()  # an earlier run's
    (tmp_path / "float32" / "metrics.jsonl").write_text("{}")
    argv = [a.format(tmp=tmp_path) for a in argv]
    got = run_ranks(1, "bench_cases:bf16_curve", argv, timeout=120)[0]
    assert got["code"] == 2 and message.format(tmp=tmp_path) in got["stderr"], got
    assert (tmp_path / "file").read_text() == "mine" and (tmp_path / "float32" / "metrics.jsonl").read_text() == "{}"
