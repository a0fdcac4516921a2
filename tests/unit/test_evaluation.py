"""Evaluation in one process: the metrics and sliding-window inference (ucfvit.eval) and the family
tasks (ucfvit.models.tasks) on hand-made inputs against hand-computed values, pictures, and the
validation options. On a mesh against one process: tests/distributed/test_evaluation.py."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from train_runs import config
from ucfvit.eval import confusion_matrix, dice_iou, psnr, sliding_window, ssim, topk_correct
from ucfvit.eval.pictures import PALETTE, draw_panels, save_png
from ucfvit.models import build_model
from ucfvit.models.tasks import Classification, EvalOptions, Panel, Reconstruction, Segmentation
from ucfvit.train.config import ConfigError
from ucfvit.train.plan import validate_config

OPTIONS = EvalOptions()


def _sums(values: dict) -> dict:
    return {k: v.double().sum(0) for k, v in values.items()}


# ------------------------------------------------------------------------------- metrics by hand
def test_topk_accuracy_counts():
    logits = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.2, 0.3, 0.4],
            [0.9, 0.1, 0.8, 0.7, 0.6, 0.5],
            [0.0, 0.0, 1.0, 0.5, 0.2, 0.1],
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
        ]
    )
    labels = torch.tensor([1, 1, 2, 5])  # top-1 hits: yes, no (rank 6), yes, no (rank 6)
    hits = topk_correct(logits, labels, ks=(1, 5))
    assert hits[1].tolist() == [1, 0, 1, 0] and hits[5].tolist() == [1, 0, 1, 0]
    assert topk_correct(logits, torch.tensor([3, 2, 3, 4]), ks=(1, 5))[5].tolist() == [1, 1, 1, 1]  # ranks 4, 2, 2, 5


def test_confusion_dice_and_iou_by_hand():
    target = torch.tensor([[0, 0, 1], [1, 2, 2]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0]])
    confusion = confusion_matrix(pred, target, 4)
    assert confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    dice, iou = dice_iou(confusion)
    # class 0: TP 1, FP 1, FN 1; class 1: TP 2, FP 1, FN 0; class 2: TP 1, FP 0, FN 1; class 3 absent.
    assert dice[:3].tolist() == pytest.approx([2 / 4, 4 / 5, 2 / 3]) and math.isnan(dice[3])
    assert iou[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 2]) and math.isnan(iou[3])
    halves = confusion_matrix(pred[:1], target[:1], 4) + confusion_matrix(pred[1:], target[1:], 4)
    assert torch.equal(halves, confusion)  # sums over shards are the whole


def test_psnr_and_ssim_by_hand():
    target = torch.zeros(2, 1, 2, 2)
    pred = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])
    assert psnr(pred, target, 1.0).tolist() == pytest.approx([10 * math.log10(4), 10 * math.log10(4)])

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(1, 1, 11, 11, generator=g), torch.rand(1, 1, 11, 11, generator=g)
    # One 11 x 11 window: Gaussian weights (sigma 1.5, normalised), weighted means, variances, covariance.
    r = torch.arange(11, dtype=torch.float64) - 5
    w1 = torch.exp(-(r**2) / (2 * 1.5**2))
    w = torch.outer(w1, w1) / w1.sum() ** 2
    a, b = x[0, 0].double(), y[0, 0].double()
    mx, my = (w * a).sum(), (w * b).sum()
    vx, vy, cxy = (w * a * a).sum() - mx**2, (w * b * b).sum() - my**2, (w * a * b).sum() - mx * my
    c1, c2 = 0.01**2, 0.03**2
    expect = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert ssim(x, y, 1.0).item() == pytest.approx(expect.item(), abs=1e-12)
    volume = torch.rand(2, 3, 12, 11, 13, generator=g)
    assert ssim(volume, volume, 1.0).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    assert (ssim(volume, volume + 0.2 * torch.rand(volume.shape, generator=g), 1.0) < 0.99).all()
    with pytest.raises(ValueError, match="at least window=11"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), 1.0)


@pytest.mark.parametrize("weights, overlap", [("gaussian", 0.5), ("uniform", 0.25), ("gaussian", 0.0)])
def test_sliding_window_with_an_identity_model_gives_the_input_back(weights, overlap):
    volume = torch.randn(2, 2, 20, 17, 13, generator=torch.Generator().manual_seed(0))
    calls = []

    def identity(tiles):
        calls.append(tiles.shape)
        return tiles.clone()

    out = sliding_window(identity, volume, (8, 8, 8), overlap=overlap, weights=weights, batch_size=5)
    torch.testing.assert_close(out, volume, rtol=1e-6, atol=1e-6)
    assert all(shape[1:] == (2, 8, 8, 8) for shape in calls)
    summed = sliding_window(lambda t: t.sum(1, keepdim=True), volume, (8, 8, 8), overlap=overlap, weights=weights)
    torch.testing.assert_close(summed, volume.sum(1, keepdim=True), rtol=1e-5, atol=1e-5)


def test_sliding_window_blends_overlapping_predictions_and_refuses_small_images():
    image = torch.zeros(1, 1, 12)[..., None].expand(1, 1, 12, 4).contiguous()
    starts = []

    def position(tiles):  # one tile per call: it predicts how many tiles came before it
        starts.append(len(starts))
        return torch.full_like(tiles, float(starts[-1]))

    out = sliding_window(position, image, (8, 4), overlap=0.5, weights="uniform", batch_size=1)
    # tiles start at 0 and 4 (the last backs up to 12 - 8 = 4): rows 4..7 average tiles 0 and 1
    assert out[0, 0, :, 0].tolist() == [0.0] * 4 + [0.5] * 4 + [1.0] * 4
    with pytest.raises(ValueError, match="smaller than the tile"):
        sliding_window(lambda t: t, torch.zeros(1, 1, 6, 6), (8, 8))


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
    values = Segmentation().evaluate(
        _Fixed(pred_logits),
        {"image": torch.zeros(1, 1, 4, 4), "seg": seg},
        lambda b: (b["image"],),
        None,
        None,
        OPTIONS,
    )
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
        values = Segmentation().evaluate(
            _Threshold(), {"image": image, "seg": truth}, lambda b: (b["image"],), None, None, options
        )
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


# ------------------------------------------------------------------------------- pictures
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


# ------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "model, argv, message",
    [
        ("vit", ["--eval.every", "5", "--eval.image-size", "64", "64"], "evaluates inputs of its own size only"),
        ("unetr", ["--eval.every", "5", "--eval.image-size", "16", "64"], "each at least the model's input"),
        (
            "diffusion",
            ["--eval.every", "5", "--arch.time-steps", "20", "--eval.sample-steps", "30"],
            "--eval.sample-steps 30 must be at most --arch.time-steps 20",
        ),
        ("unetr", ["--eval.every", "5", "--eval.split", "0.5", "0.2"], "--eval.split 0.5 0.2 must be fractions"),
        ("mae", ["--eval.samples", "0"], "--eval.samples=0 is out of range"),
    ],
)
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


# ------------------------------------------------------------------------------- sinks


@pytest.mark.parametrize("sink", ["tensorboard", "wandb"])
def test_a_sink_whose_package_is_missing_is_refused_with_the_install_command(sink, tmp_path):
    import importlib.util

    if importlib.util.find_spec(sink) is not None:
        pytest.skip(f"{sink} is installed here")
    with pytest.raises(ConfigError, match=f"--metrics.sink {sink} needs the {sink} package: pip install {sink}"):
        validate_config(config("mae", ["--metrics.sink", sink, "--run.dir", str(tmp_path / "r")]))
