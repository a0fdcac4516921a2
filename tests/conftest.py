"""Shared by every tier: the tier markers and the stop after a failing unit tier (tiers.py), the
family matrix (from the registry) and tiny model inputs for every family."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from tiers import pytest_collection_modifyitems, pytest_configure  # noqa: E402, F401 -- the tiers' hooks
from ucfvit.models import FAMILIES as REGISTRY  # noqa: E402
from ucfvit.models import list_models  # noqa: E402

FAMILIES = list_models()

# Small images per dimensionality for the debug preset (patch 4).
IMG = {2: (16, 16), 3: (8, 8, 8)}


def spec_of(model):
    """The registered FamilySpec whose class ``model`` is."""
    return next(spec for spec in REGISTRY.values() if type(model) is spec.model)


def make_inputs(model, x: torch.Tensor) -> tuple[tuple, dict]:
    """Positional args for ``model``'s forward given an image batch ``x`` (the family spec's ``inputs``)."""
    return tuple(spec_of(model).inputs(model, {"image": x})), {}


def output_tensor(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
