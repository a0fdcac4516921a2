"""Evaluation metrics on hand-made tensors against hand-computed values, and sliding-window inference."""

from __future__ import annotations

import math

import pytest
import torch

from ucfvit.eval import confusion_matrix, dice_iou, psnr, sliding_window, ssim, topk_correct


def test_topk_accuracy_counts():
    logits = torch.tensor(
        [[0.1, 0.9, 0.0, 0.2, 0.3, 0.4], [0.9, 0.1, 0.8, 0.7, 0.6, 0.5], [0.0, 0.0, 1.0, 0.5, 0.2, 0.1],
         [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]]
    )  # fmt: skip
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
