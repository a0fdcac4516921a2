"""Evaluation: the family tasks on hand-made inputs, validation during training, recipes/evaluate.py
on any mesh against one process, pictures and curves."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from distributed import run_ranks
from train_cases import config
from ucfvit.eval.pictures import PALETTE, draw_panels, save_png
from ucfvit.eval.plots import plot_run, plot_runs, read_metrics
from ucfvit.models import build_model
from ucfvit.models.tasks import Classification, EvalOptions, Panel, Reconstruction, Segmentation
from ucfvit.train.config import ConfigError
from ucfvit.train.plan import validate_config

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
OPTIONS = EvalOptions()


def _sums(values: dict) -> dict:
    return {k: v.double().sum(0) for k, v in values.items()}


# ------------------------------------------------------------------------------- tasks by hand
class _Fixed(nn.Module):
    """Returns the logits it was given, whatever the input."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out, self.img_size = out, tuple(out.shape[2:])

    def forward(self, x, variables=None, rng=None):
        return self.out


def test_classification_sums_give_hand_computed_loss_and_accuracy():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 2, 2, 1])
    batch = {"image": torch.zeros(4, 1, 2, 2), "label": labels}
    values = Classification().evaluate(_Fixed(logits), batch, lambda b: (b["image"],), None, None, OPTIONS)
    assert all(v.shape[0] == 4 for v in values.values())
    metrics = Classification().summarize(_sums(values), 4)
    expected_loss = sum(-torch.log_softmax(logits[i], 0)[labels[i]].item() for i in range(4)) / 4
    assert metrics["top1"] == 0.5 and metrics["top5"] == 1.0  # samples 0 and 2 right; 3 classes <= 5
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-6)


class _Threshold(nn.Module):
    """A segmenter without parameters: class 1 where channel 0 exceeds 0.5, else class 0 (as logits)."""

    img_size = (8, 8)

    def forward(self, x, variables=None, rng=None):
        assert tuple(x.shape[2:]) == self.img_size, "the model only ever sees tiles of its own size"
        fg = (x[:, 0] > 0.5).float()
        return torch.stack([1 - fg, fg], 1) * 20


def test_segmentation_confusion_dice_iou_by_hand_and_sliding_window_on_larger_images():
    seg = torch.tensor([[[0, 0, 1, 1]] * 4])  # (1, 4, 4): two columns of class 1
    pred_logits = torch.zeros(1, 3, 4, 4)
    pred_logits[0, 1, :, 1:] = 9  # predicts class 1 in three columns, class 0 in the first
    values = Segmentation().evaluate(_Fixed(pred_logits), {"image": torch.zeros(1, 1, 4, 4), "seg": seg},
                                     lambda b: (b["image"],), None, None, OPTIONS)  # fmt: skip
    m = Segmentation().summarize(_sums(values), 1)
    # class 0: TP 4, FN 4, FP 0 -> Dice 8/12, IoU 4/8; class 1: TP 8, FP 4 -> Dice 16/20, IoU 8/12; class 2 absent.
    assert m["dice"][:2] == pytest.approx([8 / 12, 16 / 20]) and m["dice"][2] is None
    assert m["iou"][:2] == pytest.approx([0.5, 8 / 12]) and m["iou"][2] is None
    assert m["mean_dice"] == pytest.approx(0.8) and m["mean_iou"] == pytest.approx((0.5 + 8 / 12) / 2)
    assert m["pixel_accuracy"] == pytest.approx(12 / 16)

    # 20x28 images through an 8x8 model: sliding windows reproduce the whole-image thresholding.
    image = torch.rand(2, 1, 20, 28, generator=torch.Generator().manual_seed(0))
    truth = (image[:, 0] > 0.5).long()
    for weights in ("gaussian", "uniform"):
        options = EvalOptions(window_overlap=0.25, window_weights=weights)
        values = Segmentation().evaluate(_Threshold(), {"image": image, "seg": truth}, lambda b: (b["image"],),
                                         None, None, options)  # fmt: skip
        m = Segmentation().summarize(_sums(values), 2)
        assert m["dice"] == [1.0, 1.0] and m["pixel_accuracy"] == 1.0, (weights, m)


def test_reconstruction_of_a_perfect_predictor_is_exact_and_its_baseline_is_the_mean_fill():
    model = build_model("mae", "debug", img_size=(16, 16), in_chans=2).eval()
    x = torch.rand(2, 2, 16, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 16)
    mask[:, ::3] = 1
    model.forward = lambda inp, variables=None, rng=None: (model.patchify(inp), mask)
    task = Reconstruction()
    values = task.evaluate(model, {"image": x}, lambda b: (b["image"],), None, None, OPTIONS)
    m = task.summarize(_sums(values), 2)
    assert m["loss"] == 0 and m["mse_masked"] == 0 and m["psnr"] == math.inf and m["ssim"] == pytest.approx(1.0)
    # The baseline: masked patches hold the mean of the visible ones.
    target, hidden = model.patchify(x), mask.bool().unsqueeze(-1)
    fill = torch.stack([target[i][~hidden[i].squeeze(-1)].mean() for i in range(2)])
    filled = model.unpatchify(torch.where(hidden, fill.view(2, 1, 1), target)).double()
    spread = x.flatten(1).amax(1) - x.flatten(1).amin(1)
    mse = (filled - x.double()).pow(2).flatten(1).mean(1)
    expected = (10 * torch.log10(spread.double() ** 2 / mse)).mean().item()
    assert m["psnr_masked_input"] == pytest.approx(expected, rel=1e-9)
    panels = task.pictures(model, {"image": x}, lambda b: (b["image"],), None, None, OPTIONS)
    assert [p.title for p in panels] == ["input", "masked", "reconstruction"]
    torch.testing.assert_close(panels[2].data, x)


# ------------------------------------------------------------------------------- pictures, curves
def test_pictures_draw_images_label_overlays_regions_and_3d_slices(tmp_path):
    image = torch.zeros(2, 1, 16, 16)
    image[:, :, 4:8, 4:8] = 1.0
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[:, 8:, 8:] = 2
    coords = torch.tensor([[[0, 0], [0, 8], [8, 0], [8, 8]]] * 2)
    sizes = torch.full((2, 4), 8)
    panels = [Panel("input", image, regions=(coords, sizes, None)), Panel("labels", labels, "labels", under=image)]
    picture = draw_panels(panels, rows=1)
    assert picture.dtype == np.uint8 and picture.shape[2] == 3
    assert picture.shape[0] == 22 + 4 + 128 or picture.shape[0] == 22 + 128 + 4  # title + one row (16 px x 8)
    body = picture[26:]
    column = body[:, 128 + 4 :]  # the label overlay
    colour = PALETTE[2]
    assert (np.abs(column[100, 100].astype(int) - (0.55 * colour).astype(int)) <= 1).all()  # class 2 over black
    assert (body[40, 40] == 255).all()  # the bright square, grey 1.0
    assert (body[0, 70] == (255, 200, 0)).all()  # a region outline
    volume = Panel("volume", torch.rand(1, 1, 12, 10, 8))
    wide = draw_panels([volume])
    # three middle slices side by side, enlarged x11 (the longest side, 12, to at least 128 pixels):
    # (10, 8), (12, 8) and (12, 10) views -> 88 + 88 + 110 wide, two gaps of 4, 132 high under the title
    assert wide.shape[:2] == (22 + 4 + 132, 88 + 88 + 110 + 2 * 4)
    path = save_png(tmp_path / "sub" / "p.png", picture)
    back = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert np.array_equal(back, picture)


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


# ------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "model, argv, message",
    [
        ("vit", ["--eval.every", "5", "--eval.image-size", "64", "64"], "evaluates inputs of its own size only"),
        ("unetr", ["--eval.every", "5", "--eval.image-size", "16", "64"], "each at least the model's input"),
        ("diffusion", ["--eval.every", "5", "--arch.time-steps", "20", "--eval.sample-steps", "30"],
         "--eval.sample-steps 30 must be at most --arch.time-steps 20"),
        ("unetr", ["--eval.every", "5", "--eval.split", "0.5", "0.2"], "--eval.split 0.5 0.2 must be fractions"),
        ("mae", ["--eval.samples", "0"], "--eval.samples=0 is out of range"),
    ],
)  # fmt: skip
def test_bad_validation_options_are_refused_before_anything_runs(model, argv, message, tmp_path):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        validate_config(config(model, [*argv, "--run.dir", str(tmp_path / "run")]))
    assert not (tmp_path / "run").exists()


def test_validation_on_files_needs_files_that_training_does_not_read(tmp_path):
    root = tmp_path / "npy"
    root.mkdir()
    for i in range(4):
        np.save(root / f"{i}.npy", np.zeros((3, 32, 32), dtype=np.float32))
    argv = ["--data.kind", "npy", "--data.root", str(root), "--eval.every", "5", "--run.dir", str(tmp_path / "r")]
    with pytest.raises(ConfigError, match="--data.split 0 0.9"):
        validate_config(config("mae", argv))
    validate_config(config("mae", [*argv, "--data.split", "0", "0.75"]))


# ------------------------------------------------------------------------------- on a mesh
@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluation")
    on_mesh = run_ranks(4, "eval_cases:train_then_evaluate", str(tmp), "2x1x2", timeout=500)
    single = run_ranks(1, "eval_cases:evaluate_on", str(tmp), "1x1x1", "single", timeout=300)[0]
    return tmp, on_mesh, single


def _close(a, b, where: str) -> None:
    assert set(a) == set(b), where
    for key in a:
        if isinstance(a[key], list):
            assert len(a[key]) == len(b[key]), (where, key)
            for x, y in zip(a[key], b[key], strict=True):
                assert (x is None and y is None) or x == pytest.approx(y, rel=1e-5, abs=1e-7), (where, key, a, b)
        else:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (where, key, a[key], b[key])


@pytest.mark.parametrize("family", ["vit", "mae", "unetr", "sap", "diffusion"])
def test_evaluation_on_2x1x2_equals_one_process(evaluated, family):
    tmp, on_mesh, single = evaluated
    for rank in on_mesh:
        got = rank[family]
        assert got["evaluate"]["samples"] == 6
        # validation during training (step 2) and recipes/evaluate.py see the same weights and samples
        _close(got["during_training"][-1], got["evaluate"], f"{family}: training-time vs evaluate.py")
        _close(got["evaluate"], single[family], f"{family}: 2x1x2 vs 1x1x1")
    if family == "unetr":
        assert single[family]["dice"] and single[family]["mean_iou"] is not None
    assert (tmp / f"single_{family}" / "eval.json").is_file()
    picture = tmp / f"single_{family}" / "pictures" / f"{family}_eval.png"
    assert (picture.is_file()) == (family != "vit"), picture  # classifiers have no picture
    assert (tmp / family / "curves.png").is_file()


# ------------------------------------------------------------------------------- hooks and sinks
def test_a_hook_stops_the_run_at_the_next_sync_point_and_sinks_see_the_metrics(tmp_path):
    results = run_ranks(2, "eval_cases:hooks_stop_the_run", str(tmp_path), timeout=300)
    assert results[0]["calls"] == results[1]["calls"]  # every rank: the same calls, the same values
    r = results[0]
    # the hook asks to stop after validating at step 2; the ranks agree at step 3's sync, save and stop
    assert r["steps"] == 3 and r["stopped"], r
    kinds = [(c[0], c[1]) for c in r["calls"]]
    assert kinds == [("step", 1), ("step", 2), ("eval", 2), ("step", 3), ("checkpoint", 3)], kinds
    assert r["calls"][2][2] == 4 and r["calls"][-1][2] == "step-00000003"
    names = {name for name, _ in r["scalars"]}
    assert {"train/loss", "train/lr", "eval/loss", "eval/psnr"} <= names, names
    assert ("eval/loss", 2) in [tuple(x) for x in r["scalars"]] and r["closed"]


@pytest.mark.parametrize("sink", ["tensorboard", "wandb"])
def test_a_sink_whose_package_is_missing_is_refused_with_the_install_command(sink, tmp_path):
    import importlib.util

    if importlib.util.find_spec(sink) is not None:
        pytest.skip(f"{sink} is installed here")
    with pytest.raises(ConfigError, match=f"--metrics.sink {sink} needs the {sink} package: pip install {sink}"):
        validate_config(config("mae", ["--metrics.sink", sink, "--run.dir", str(tmp_path / "r")]))
