"""SAP (ucfvit.models.sap) beyond shapes: its output depends on the patches' positions and sizes, and
it pastes regions of mixed sizes into the right place. Shapes and gradients of every family:
test_models.py."""

from __future__ import annotations

import torch

from conftest import IMG
from ucfvit.models import build_model, grid_patches


def test_sap_output_depends_on_patch_positions_and_sizes():
    model = build_model("sap", "debug", img_size=IMG[2]).eval()
    x = torch.randn(1, 3, *IMG[2])
    patches, coords, sizes, _ = grid_patches(x, 4)
    base = model(patches, coords, sizes)
    swapped = coords.clone()
    swapped[:, [0, 5]] = coords[:, [5, 0]]
    moved = model(patches, swapped, sizes)
    assert not torch.allclose(moved, base)
    bigger = sizes.clone()
    bigger[:, 0] = 8  # same corner, larger region: the size embedding changes every prediction
    assert not torch.allclose(model(patches, coords, bigger)[..., 8:, 8:], base[..., 8:, 8:])


def test_sap_pastes_mixed_region_sizes_into_the_right_place():
    model = build_model("sap", "debug", img_size=(16, 16), num_classes=1, depth=1).eval()
    # One 8x8 region (top-left) + 12 regions of 4x4 tile the 16x16 image.
    coords = [[0, 0]] + [[r, c] for r in range(0, 16, 4) for c in range(0, 16, 4) if r >= 8 or c >= 8]
    sizes = [8] + [4] * 12
    coords_t, sizes_t = torch.tensor([coords]), torch.tensor([sizes])
    pred = torch.arange(13, dtype=torch.float32).view(1, 13, 1).expand(1, 13, 16).clone()  # constant per patch
    dense = model.paste(pred, coords_t, sizes_t)
    assert dense.shape == (1, 1, 16, 16)
    assert (dense[0, 0, :8, :8] == 0).all()
    for i, (r, c) in enumerate(coords[1:], start=1):
        assert (dense[0, 0, r : r + 4, c : c + 4] == i).all()
    out = model(torch.randn(1, 13, 3, 4, 4), coords_t, sizes_t)
    assert out.shape == (1, 1, 16, 16) and out.isfinite().all()
