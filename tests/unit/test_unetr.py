"""UNETR (ucfvit.models.unetr) beyond shapes: its skip connections reach the output, and its taps
follow the paper (reusing blocks when there are fewer blocks than decoder stages). Shapes and
gradients of every family: test_models.py."""

from __future__ import annotations

import pytest
import torch

from ucfvit.models import build_model


@pytest.mark.parametrize("ndim", [2, 3])
def test_unetr_skip_connections_are_wired(ndim):
    size = (32,) * ndim if ndim == 2 else (16,) * 3
    model = build_model("unetr", "debug", img_size=size, patch_size=8, depth=3).eval()
    assert len(model.decoder.skips) == 2 and model.taps == (0, 1)
    x = torch.randn(1, 3, *size)
    base = model(x)
    for module in [model.decoder.image_skip, *model.decoder.skips]:
        handle = module.register_forward_hook(lambda m, i, out: out + 1.0)
        assert not torch.allclose(model(x), base), f"{module} does not reach the output"
        handle.remove()
    no_skip = build_model("unetr", "debug", img_size=size, patch_size=8, skip_connection=False)
    assert not hasattr(no_skip.decoder, "skips") and no_skip(x).shape == base.shape


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_unetr_with_fewer_blocks_than_decoder_stages_reuses_blocks(depth):
    model = build_model("unetr", "debug", img_size=(32, 32), patch_size=16, depth=depth)  # 4 stages, 3 taps
    assert len(model.taps) == 3 and all(0 <= t < depth for t in model.taps)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2, 32, 32)


def test_unetr_taps_follow_the_paper_for_depth_12_patch_16():
    with torch.device("meta"):
        model = build_model("unetr", "base", img_size=(64, 64))
    assert model.taps == (2, 5, 8)  # blocks 3, 6, 9 (1-based) feed the decoder
