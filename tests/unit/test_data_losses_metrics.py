"""Synthetic data, losses and the FLOP count."""

from __future__ import annotations

import torch

from ucfvit.data import SyntheticImages
from ucfvit.models import SampleRNG, build_model
from ucfvit.models.losses import dice_losses, segmentation_loss, segmentation_losses
from ucfvit.models.rng import randn
from ucfvit.train.throughput import train_flops_per_sample


def test_synthetic_samples_are_a_function_of_seed_and_index():
    data = SyntheticImages((16, 16), in_chans=2, num_classes=3, seed=4)
    a, b = data.sample(7), SyntheticImages((16, 16), in_chans=2, num_classes=3, seed=4).sample(7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(data.sample(8)["image"], a["image"])
    assert not torch.equal(SyntheticImages((16, 16), 2, 3, seed=5).sample(7)["image"], a["image"])
    assert (
        a["image"].shape == (2, 16, 16) and a["seg"].shape == (16, 16) and set(a["seg"].unique().tolist()) <= {0, 1, 2}
    )
    counts = torch.bincount(a["seg"].flatten(), minlength=3)[1:]
    assert int(a["label"]) == int(counts.argmax()) + 1
    batch = data.batch(range(3, 6))
    assert torch.equal(batch["image"][1], data.sample(4)["image"])


def test_synthetic_volumes():
    vol = SyntheticImages((8, 12, 16), in_chans=1, num_classes=3).sample(0)
    assert vol["image"].shape == (1, 8, 12, 16) and vol["seg"].shape == (8, 12, 16)
    assert (vol["seg"] > 0).any(), "every volume holds some aggregate or pore"


def test_sample_rng_normals_are_standard_and_split_invariant():
    z = randn(SampleRNG(0, 0, 0, 4), (4, 50_000), "cpu")
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02
    part = randn(SampleRNG(0, 0, 2, 4), (2, 50_000), "cpu")
    assert torch.equal(part, z[2:])


def test_dice_loss_is_zero_for_a_perfect_prediction_and_positive_otherwise():
    target = torch.randint(0, 3, (2, 8, 8))
    perfect = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float() * 100
    assert (dice_losses(perfect, target) < 1e-3).all()
    assert (dice_losses(torch.zeros(2, 3, 8, 8), target) > 0.3).all()


def test_segmentation_loss_is_the_mean_of_its_per_sample_terms():
    # The training loss (a batch mean) and evaluation's per-sample terms are one definition:
    # pixel cross-entropy over the whole batch plus the mean soft Dice.
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(3, 4, 6, 5, generator=g), torch.randint(0, 4, (3, 6, 5), generator=g)
    per_sample = segmentation_losses(logits, target)
    assert per_sample.shape == (3,)
    torch.testing.assert_close(segmentation_loss(logits, target), per_sample.mean())
    expected = torch.nn.functional.cross_entropy(logits, target) + dice_losses(logits, target).mean()
    torch.testing.assert_close(segmentation_loss(logits, target), expected)


def test_flop_count_of_vit_base_matches_the_published_figure():
    with torch.device("meta"):
        model = build_model("vit", "base", img_size=224)
    # ViT-B/16 at 224 px: 17.58 GMACs per forward (timm / fvcore), i.e. 35.2 GFLOPs.
    forward = train_flops_per_sample(model) / 3
    assert abs(forward - 2 * 17.58e9) / (2 * 17.58e9) < 0.01
