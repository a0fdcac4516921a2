"""Worker side of the trainer tests: run ucfvit.train.train in forked ranks."""

from __future__ import annotations

import os
import signal

import torch
import tyro
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from ucfvit.parallel import full_state_dict
from ucfvit.train import checkpoint as ckpt_module
from ucfvit.train.config import Config
from ucfvit.train.export import load_exported
from ucfvit.train.presets import preset
from ucfvit.train.trainer import train


def config(model: str, argv: list[str]) -> Config:
    """The CPU preset of ``model`` with command-line style overrides."""
    return tyro.cli(Config, default=preset(model, accelerator=False), args=["--model", model, *argv])


def run(model: str, argv: list[str]) -> dict:
    """Train; report the outcome (and a digest of the final parameters)."""
    result = train(config(model, argv))
    state = full_state_dict(result.model, rank0_only=False)
    return {
        "steps": result.steps_done, "stopped": result.stopped_early, "loss": result.last_loss,
        "params": {k: v.double().sum().item() for k, v in state.items()},
    }  # fmt: skip


def error(model: str, argv: list[str]) -> str:
    try:
        train(config(model, argv))
    except ValueError as err:
        return f"ValueError: {err}"
    return "no error"


def all_presets(steps: int, run_dir: str) -> list[dict]:
    """Every family in 2D and 3D for ``steps`` steps on one rank."""
    out = []
    for model in ("vit", "mae", "unetr", "sap", "diffusion"):
        for img in (["32", "32"], ["16", "16", "16"]):
            result = train(
                config(
                    model,
                    [
                        "--max-steps",
                        str(steps),
                        "--arch.img-size",
                        *img,
                        "--run.dir",
                        f"{run_dir}/{model}-{len(img)}d",
                        "--metrics.log-every",
                        "1",
                    ],
                )
            )
            out.append({"model": model, "ndim": len(img), "steps": result.steps_done, "loss": result.last_loss})
    return out


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


def checkpoint_keys(model: str, argv: list[str]) -> list[str]:
    """Keys a checkpoint of this configuration holds (model state dict, after one training run)."""
    result = train(config(model, argv))
    return sorted(get_model_state_dict(result.model))
