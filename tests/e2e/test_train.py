"""The trainer run as a user runs it, in ranks of the rank runner (tests/train_runs.py; functions
defined here run in the ranks too): every preset, gradient accumulation, resuming with the resolved
model options, crash-safe checkpoint writes and checkpoint keys. On several ranks:
tests/distributed/test_train.py; the schedule and parameter groups: tests/unit/test_optim.py."""

from __future__ import annotations

import json
import math
import os
import re
import signal

import pytest
from torch.distributed.checkpoint.state_dict import get_model_state_dict

import train_runs
from rank_runner import run_ranks
from train_runs import config
from ucfvit.train import checkpoint as ckpt_module
from ucfvit.train.checkpoint import find_checkpoint, is_complete
from ucfvit.train.trainer import train


def all_presets(steps: int, run_dir: str) -> list[dict]:
    """Every family in 2D and 3D for ``steps`` steps on one rank."""
    out = []
    for model in ("vit", "mae", "unetr", "sap", "diffusion"):
        for img in (["32", "32"], ["16", "16", "16"]):
            argv = ["--max-steps", str(steps), "--arch.img-size", *img, "--metrics.log-every", "1"]
            result = train(config(model, [*argv, "--run.dir", f"{run_dir}/{model}-{len(img)}d"]))
            out.append({"model": model, "ndim": len(img), "steps": result.steps_done, "loss": result.last_loss})
    return out


def test_every_preset_runs_three_steps_in_2d_and_3d(tmp_path):
    results = run_ranks(1, all_presets, 3, str(tmp_path), timeout=400)[0]
    assert {(r["model"], r["ndim"]) for r in results} == {
        (m, d) for m in ("vit", "mae", "unetr", "sap", "diffusion") for d in (2, 3)
    }
    for r in results:
        assert r["steps"] == 3 and math.isfinite(r["loss"]), r


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    common = ["--mesh", "1x2x1", "--max-steps", "2", "--data.global-batch-size", "8"]
    big = run_ranks(2, train_runs.run, "mae", [*common, "--run.dir", str(tmp_path / "a")])[0]
    acc = run_ranks(
        2, train_runs.run, "mae", [*common, "--data.micro-batch-size", "2", "--run.dir", str(tmp_path / "b")]
    )[0]
    assert abs(big["loss"] - acc["loss"]) < 1e-6
    for k, v in big["params"].items():
        assert abs(v - acc["params"][k]) <= 1e-5 * max(1.0, abs(v)), k


def test_resume_compares_the_resolved_model_options(tmp_path):
    """The preset's depth spelled out resumes; a real difference is refused naming both values."""
    from ucfvit.train.cli import parse
    from ucfvit.train.plan import validate_config

    common = ["--run.dir", str(tmp_path), "--checkpoint.resume", "auto"]
    run_ranks(1, train_runs.run, "mae", ["--max-steps", "1", *common])
    resumed = run_ranks(1, train_runs.run, "mae", ["--max-steps", "2", "--arch.depth", "2", *common])[0]
    assert resumed["steps"] == 2
    for option, message in [
        ("--arch.qkv-bias", r"\(--arch.qkv-bias: checkpoint True, this run False\)"),
        ("--arch.rope", r"\(--arch.rope: checkpoint False, this run True\)"),
    ]:
        cfg = parse(["--model", "mae", option, str("rope" in option), *common])
        with pytest.raises(ValueError, match=message + r"; to resume it, pass the checkpoint's values of " + option):
            validate_config(cfg)
    # Through train() on two ranks: every rank refuses alike, before any collective.
    argv = ["--mesh", "1x2x1", "--arch.depth", "3", *common]
    for msg in run_ranks(2, train_runs.error, "mae", argv, timeout=120):
        assert re.search(r"holds a different model \(--arch.depth: checkpoint 2, this run 3\)", msg), msg


def crash_during_save(model: str, argv: list[str], when: str) -> None:
    """SIGKILL this (single) rank during its second checkpoint write: ``when`` is ``start``
    (temporary directory just created) or ``after_shards`` (DCP files written, not yet renamed)."""
    real_save = ckpt_module.dcp.save
    calls = []

    def save(state, checkpoint_id):
        calls.append(checkpoint_id)
        if len(calls) == 2 and when == "start":
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(state, checkpoint_id=checkpoint_id)
        if len(calls) == 2 and when == "after_shards":
            os.kill(os.getpid(), signal.SIGKILL)

    ckpt_module.dcp.save = save
    train(config(model, argv))


@pytest.mark.parametrize("when", ["start", "after_shards"])
def test_sigkill_during_checkpoint_write_keeps_the_previous_one(tmp_path, when):
    argv = ["--max-steps", "4", "--checkpoint.every", "2", "--run.dir", str(tmp_path)]
    with pytest.raises(RuntimeError, match="exit code"):
        run_ranks(1, crash_during_save, "mae", argv, when)
    assert (tmp_path / "checkpoints" / "step-00000004.tmp").is_dir()  # the interrupted write
    ckpt = find_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "step-00000002" and is_complete(ckpt)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000002"
    resumed = run_ranks(1, train_runs.run, "mae", [*argv, "--checkpoint.resume", "auto"])[0]
    assert resumed["steps"] == 4 and find_checkpoint(tmp_path).name == "step-00000004"


def checkpoint_keys(model: str, argv: list[str]) -> list[str]:
    """Keys a checkpoint of this configuration holds (model state dict, after one training run)."""
    result = train(config(model, argv))
    return sorted(get_model_state_dict(result.model))


def test_checkpoint_keys_do_not_depend_on_activation_checkpointing_or_compile(tmp_path):
    argv = ["--mesh", "1x1x2", "--max-steps", "1"]
    plain = run_ranks(2, checkpoint_keys, "vit", [*argv, "--run.dir", str(tmp_path / "a")])[0]
    full = ["--parallel.activation-checkpointing", "full"]
    ac = run_ranks(2, checkpoint_keys, "vit", [*argv, "--run.dir", str(tmp_path / "b"), *full])[0]
    assert plain == ac and "blocks.0.attn.q.weight" in plain
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["model"] == "vit"
