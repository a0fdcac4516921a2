"""MAE (ucfvit.models.mae) beyond shapes: it keeps the reference number of tokens, its masks follow
the generator, and its loss counts only masked patches (also with normalised pixels). Shapes and
gradients of every family: test_models.py."""

from __future__ import annotations

import pytest
import torch

from conftest import IMG
from ucfvit.models import build_model


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.75, 0.9, 0.99])
@pytest.mark.parametrize("ndim", [2, 3])
def test_mae_keeps_the_reference_number_of_tokens(ratio, ndim):
    model = build_model("mae", "debug", img_size=IMG[ndim], mask_ratio=ratio)
    n = model.num_patches
    keep = max(1, int(n * (1 - ratio)))
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    _, mask = model(torch.randn(3, 3, *IMG[ndim]))
    assert seen == [keep + model.num_prefix_tokens]
    assert mask.shape == (3, n) and (mask.sum(dim=1) == n - keep).all()


def test_same_generator_gives_the_same_mask():
    model = build_model("mae", "debug", img_size=IMG[2])
    x = torch.randn(4, 3, *IMG[2])
    _, m1 = model(x, rng=torch.Generator().manual_seed(3))
    _, m2 = model(x, rng=torch.Generator().manual_seed(3))
    _, m3 = model(x, rng=torch.Generator().manual_seed(4))
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert not torch.equal(m1[0], m1[1]), "each sample gets its own mask"


@pytest.mark.parametrize("linear", [False, True])
def test_mae_loss_counts_only_masked_patches(linear):
    model = build_model("mae", "debug", img_size=IMG[2], linear_decoder=linear)
    x = torch.randn(2, 3, *IMG[2])
    pred, mask = model(x)
    target = model.patchify(x)
    perfect_on_masked = torch.where(mask.bool().unsqueeze(-1), target, pred + 10.0)
    assert model.loss(x, perfect_on_masked, mask) == 0
    assert model.loss(x, pred, mask) > 0


def test_mae_norm_pix_loss_normalises_each_target_patch():
    model = build_model("mae", "debug", img_size=IMG[2], norm_pix_loss=True)
    x = torch.randn(2, 3, *IMG[2]) * 5 + 3
    target = model.patchify(x)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    mask = torch.ones(2, model.num_patches)
    assert model.loss(x, normed, mask) < 1e-10
    assert model.loss(x, target, mask) > 1
