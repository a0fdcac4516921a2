"""The trainer on several ranks: bad options fail on every rank alike before any collective, the
export of a sharded model equals the parallel model, and a checkpoint reshards onto other meshes.
One rank and one run per test: tests/e2e/test_train.py."""

from __future__ import annotations

import re

import pytest
import torch

import train_runs
from rank_runner import run_ranks
from train_runs import config
from ucfvit.train.export import load_exported
from ucfvit.train.trainer import train


@pytest.mark.parametrize(
    "world, argv, match",
    [
        (2, ["--mesh", "2x2x2"], r"mesh 2x2x2 has 8 ranks but the world size is 2"),
        (
            2,
            ["--mesh", "1x2x1", "--checkpoint.resume", "/nonexistent/ckpt"],
            r"--checkpoint.resume=/nonexistent/ckpt: no complete checkpoint",
        ),
        (
            2,
            ["--mesh", "1x2x1", "--run.dir", "/dev/null/run"],
            r"--run.dir=/dev/null/run cannot be created \(/dev/null is not a directory\)",
        ),
        (
            2,
            ["--mesh", "1x1x2", "--arch.num-heads", "3", "--arch.embed-dim", "48"],
            r"num_heads=3 .* not divisible by tp=2",
        ),
        (
            2,
            ["--mesh", "1x2x1", "--data.global-batch-size", "5"],
            r"global-batch-size=5 must be divisible by the data-parallel size",
        ),
        (
            2,
            ["--mesh", "1x1x2", "--parallel.compile", "--parallel.activation-checkpointing", "full"],
            r"on mesh 1x1x2: activation_checkpointing='full' with compile=True and tp > 1",
        ),
    ],
)
def test_bad_options_fail_on_every_rank_before_any_collective(world, argv, match, tmp_path):
    if "--run.dir" not in argv:
        argv = [*argv, "--run.dir", str(tmp_path)]
    messages = run_ranks(world, train_runs.error, "mae", argv, timeout=120)
    for msg in messages:
        assert re.search(match, msg), msg


def export_matches(model: str, argv: list[str]) -> dict:
    """Exported safetensors in a plain model reproduce the parallel model's outputs."""
    result = train(config(model, [*argv, "--checkpoint.export-safetensors"]))
    parallel = result.model.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = parallel(x, rng=torch.Generator().manual_seed(1))
    out = out[0] if isinstance(out, tuple) else out
    if torch.distributed.get_rank() != 0:
        return {}
    plain = load_exported(result.run_dir).eval()
    ref = plain(x, rng=torch.Generator().manual_seed(1))
    ref = ref[0] if isinstance(ref, tuple) else ref
    return {
        "diff": (out - ref).abs().max().item(),
        "plain_is_plain": not any(type(p).__name__ == "DTensor" for p in plain.parameters()),
    }


def test_exported_safetensors_reproduce_the_parallel_model(tmp_path):
    r = run_ranks(4, export_matches, "mae", ["--mesh", "1x2x2", "--max-steps", "2", "--run.dir", str(tmp_path)])[0]
    assert r["plain_is_plain"] and r["diff"] < 1e-5, r
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "model_config.json").is_file()


def test_checkpoint_reshards_onto_other_meshes(tmp_path):
    common = ["--metrics.log-every", "1", "--max-steps", "4", "--arch.drop-path-rate", "0.1"]
    src = tmp_path / "src"
    argv = [*common, "--mesh", "2x2x2", "--checkpoint.every", "3", "--checkpoint.keep", "3", "--run.dir", str(src)]
    ref = run_ranks(8, train_runs.run, "mae", argv)[0]
    ckpt = src / "checkpoints" / "step-00000003"
    for world, mesh in [(8, "1x4x2"), (4, "1x1x4"), (2, "2x1x1"), (1, "1x1x1")]:
        argv = [*common, "--mesh", mesh, "--checkpoint.resume", str(ckpt), "--run.dir", str(tmp_path / mesh)]
        out = run_ranks(world, train_runs.run, "mae", argv)[0]
        assert out["steps"] == 4
        assert abs(out["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (mesh, out["loss"], ref["loss"])
