"""Evaluation as a user runs it: recipes/plot.py draws the curves of runs, and the fine-tuning gain
benchmark (benchmarks/finetune_gain.py) pretrains an MAE and fine-tunes from it and from scratch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from ucfvit.eval.plots import plot_run, plot_runs, read_metrics

ROOT = Path(__file__).resolve().parents[2]


def test_curves_from_metrics_jsonl(tmp_path):
    pytest.importorskip("matplotlib")
    for name, scale in (("a", 1.0), ("b", 0.5)):
        run = tmp_path / name
        run.mkdir()
        lines = [{"step": s, "loss": scale / s, "lr": 1e-3, "images_per_s": 100.0, "mfu": None} for s in range(1, 9)]
        lines += [{"step": 4, "eval": {"loss": scale / 3, "psnr": 20.0, "samples": 8}}, "not json"]
        (run / "metrics.jsonl").write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    train, evals = read_metrics(tmp_path / "a")
    assert len(train) == 8 and evals == [{"step": 4, "eval": {"loss": 1 / 3, "psnr": 20.0, "samples": 8}}]
    out = plot_run(tmp_path / "a")
    assert out == tmp_path / "a" / "curves.png" and cv2.imread(str(out)).shape[0] > 300
    both = plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "both.png", labels=["scratch", "fine-tuned"])
    assert cv2.imread(str(both)) is not None
    argv = [
        str(ROOT / "recipes" / "plot.py"),
        str(tmp_path / "a"),
        str(tmp_path / "b"),
        "--out",
        str(tmp_path / "c.png"),
    ]
    result = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    assert result.returncode == 0 and (tmp_path / "c.png").is_file(), result.stderr


def test_finetune_gain_benchmark_runs_pretraining_and_both_fine_tunings(tmp_path):
    pytest.importorskip("matplotlib")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "finetune_gain.py"), "--out", str(tmp_path / "fg"), "--quick"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    record = json.loads(out.stdout.strip().splitlines()[-1])
    (seed,) = record["seeds"]
    assert record["pretrain_steps"] == 8 and seed["mae"]["step"] == 8
    assert seed["scratch"]["step"] == seed["from_mae"]["step"] == 6
    # the two fine-tunings differ only by their start: the MAE's encoder is what was loaded
    assert seed["scratch"]["loss"] != seed["from_mae"]["loss"]
    assert seed["loss_gain"] == pytest.approx(seed["scratch"]["loss"] - seed["from_mae"]["loss"])
    log = (tmp_path / "fg" / "seed0" / "from_mae.log").read_text()
    assert "initialised from ucfvit checkpoint" in log and "fresh" in log
    assert cv2.imread(seed["plot"]) is not None
    refused = subprocess.run(cmd, capture_output=True, text=True)  # --out now holds runs: never overwritten
    assert refused.returncode != 0 and "is not empty" in refused.stderr
