"""Shared test helpers: tiny model inputs for every family."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from ucfvit.models import grid_patches  # noqa: E402

FAMILIES = ["vit", "mae", "unetr", "sap", "diffusion"]

# Small images per dimensionality for the debug preset (patch 4).
IMG = {2: (16, 16), 3: (8, 8, 8)}


def make_inputs(model, x: torch.Tensor, t: torch.Tensor | None = None) -> tuple[tuple, dict]:
    """Positional args for ``model``'s forward given an image batch ``x``."""
    name = type(model).__name__
    if name == "SAP":
        return grid_patches(x, model.patch_size), {}
    if name == "DiffusionViT":
        t = torch.arange(x.shape[0]) * 7 % model.time_steps if t is None else t
        return (x, t), {}
    return (x,), {}


def output_tensor(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
