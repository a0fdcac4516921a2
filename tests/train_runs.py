"""The trainer in a rank (tests/rank_runner.py): configs from the CPU preset with command-line style
overrides, a run or its error as JSON, and the losses a run logged."""

from __future__ import annotations

import json
from pathlib import Path

import tyro

from ucfvit.parallel import full_state_dict
from ucfvit.train.config import Config
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
        "steps": result.steps_done,
        "stopped": result.stopped_early,
        "loss": result.last_loss,
        "params": {k: v.double().sum().item() for k, v in state.items()},
    }


def error(model: str, argv: list[str]) -> str:
    try:
        train(config(model, argv))
    except ValueError as err:
        return f"ValueError: {err}"
    return "no error"


def losses(run_dir: Path) -> dict[int, list[float]]:
    """Step -> losses logged for it in metrics.jsonl (a resume cuts the file back to its checkpoint's
    step, so each step should appear once)."""
    out: dict[int, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.setdefault(record["step"], []).append(record["loss"])
    return out
