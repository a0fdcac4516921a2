"""The family spec is the one declaration of a family: a family defined in this file (its model, loss
and recipe) trains through ``ucfvit.train.train`` in a rank, and its name cannot take a built-in's;
the recipe reports an option the family does not take in one line. The CLI and the registry in one
process: tests/unit/test_family_spec.py."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch.nn.functional as F
from torch import nn

from rank_runner import run_ranks
from ucfvit.models import FamilySpec, VisionTransformer, list_models, register_family
from ucfvit.models.registry import FAMILIES
from ucfvit.train.cli import parse


class IntensityRegressor(VisionTransformer):
    """Predicts each channel's mean intensity from the mean of the encoder's patch tokens."""

    def __init__(self, **encoder_kwargs):
        super().__init__(**encoder_kwargs)
        self.head = nn.Linear(self.embed_dim, self.in_chans)

    def forward(self, x, variables=None, *, rng=None):
        tokens = self.forward_features(x, variables, rng=rng)
        return self.head(tokens[:, self.num_prefix_tokens :].mean(dim=1))


def _regression_loss(model, batch, rng, extra):
    x = batch["image"]
    return F.mse_loss(model(x, rng=rng).float() * extra, x.flatten(2).mean(-1) * extra)


TOY = FamilySpec(
    "toy",
    IntensityRegressor,
    loss=_regression_loss,
    extra=lambda model: 2.0,
    recipe={"arch.class_token": False, "optim.lr": 1e-3},
)


def train_toy(run_dir: str) -> dict:
    """In a fresh rank process: register the toy family, then train it 2 steps by the CLI path."""
    from ucfvit.train import train

    register_family(TOY)
    cfg = parse(["--model", "toy", "--max-steps", "2", "--metrics.log-every", "1", "--run.dir", run_dir])
    result = train(cfg)
    return {
        "steps": result.steps_done,
        "loss": result.last_loss,
        "choices": list_models(),
        "lr": cfg.optim.lr,
        "class_token": result.model.cls_token is not None,
    }


def test_a_family_defined_in_a_test_file_trains_through_the_trainer(tmp_path):
    r = run_ranks(1, train_toy, str(tmp_path))[0]
    assert r["steps"] == 2 and math.isfinite(r["loss"]), r
    assert "toy" in r["choices"] and r["lr"] == 1e-3 and r["class_token"] is False  # its recipe applied
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert "toy" not in list_models(), "the registration lived in the rank process only"


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="'vit' is already registered"):
        register_family(dataclasses.replace(TOY, name="vit"))
    assert FAMILIES["vit"].model.__name__ == "ViT"


def test_the_recipe_reports_a_bad_option_in_one_line_without_traceback(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, str(Path(__file__).parents[2] / "recipes" / "train.py"), "--model", "vit"]
    out = subprocess.run([*cmd, "--arch.mask-ratio", "0.5", "--run.dir", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines() == [
        "recipes/train.py: error: --model vit does not take ['mask_ratio'] (--arch.mask-ratio applies to mae); "
        "remove the option or pick another --model"
    ]
