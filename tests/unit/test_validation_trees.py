"""Validation feeds a model the adaptive patches training feeds it: the same trees (one shared by the
channels, or one per channel with ``--data.separate-channels``), from the run plan's transform."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from train_runs import config
from ucfvit.parallel import make_mesh
from ucfvit.train.data_setup import channel_batches
from ucfvit.train.plan import validate_config
from ucfvit.train.validation import Validator


@pytest.fixture
def one_rank():
    mesh = make_mesh("1x1x1", device_type="cpu")
    yield mesh
    dist.destroy_process_group()


def _sequences(model, run) -> list[tuple]:
    """Every patch sequence ``run()`` passes to ``model``'s forward: (variables, coords, sizes, patches)."""
    seen = []

    def record(module, args, kwargs):
        seq, variables = args[0], kwargs["variables"]
        seen.append((tuple(variables), seq.coords.clone(), seq.sizes.clone(), seq.patches.clone()))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("separate", [False, True], ids=["shared-tree", "tree-per-channel"])
def test_validation_sees_the_trees_training_cuts(tmp_path, one_rank, separate):
    model = ["--arch.img-size", "16", "16", "--arch.patch-size", "4", "--arch.fixed-length", "10"]
    channels = ["--arch.in-chans", "2", "--arch.variables", "ct", "pet", "--arch.single-channel", "True"]
    validation = ["--eval.every", "1", "--eval.samples", "2", "--eval.batch-size", "2"]
    argv = [*model, *channels, *validation, "--run.dir", str(tmp_path)]
    plan = validate_config(config("sap", [*argv, *(["--data.separate-channels"] if separate else [])]))
    assert plan.tree is not None and plan.tree.separate_channels == separate
    model = plan.model.to_empty(device="cpu")
    model.init_weights()
    validator = Validator(model, plan.spec, plan.inputs, one_rank, plan.cfg, tmp_path, None, plan.tree)
    got = _sequences(model, validator.run)

    # What the training loop feeds the model for the same samples: the loader's transform on each
    # whole sample, then one batch per channel (the trainer's channel_batches).
    samples = [plan.tree(validator.sources[d].sample(k)) for d, k in validator.keys]
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    parts = channel_batches(batch, model.variables, plan.cfg.data.separate_channels)
    expected = _sequences(model, lambda: [model(*plan.spec.inputs(model, p), variables=p["variables"]) for p in parts])

    assert len(got) == len(expected) == 2  # one forward per channel
    for (var_a, *seq_a), (var_b, *seq_b) in zip(got, expected, strict=True):
        assert var_a == var_b
        for a, b in zip(seq_a, seq_b, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
