"""The trainer with ``--parallel.compile`` under inductor, generating C++ kernels on this CPU: the whole
model as one graph on 1x1x1, a graph per block on an FSDP mesh. Losses match the eager runs."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import train_runs
from rank_runner import run_ranks
from train_runs import config
from ucfvit.train.trainer import train

STEPS = ["--max-steps", "4", "--metrics.log-every", "2"]


def train_with_counters(model: str, argv: list[str]) -> dict:
    """Run the trainer (in a rank) and report its last loss and what dynamo compiled."""
    torch._dynamo.reset()
    counters.clear()
    result = train(config(model, argv))
    return {
        "steps": result.steps_done,
        "loss": result.last_loss,
        "graph_breaks": sum(counters["graph_break"].values()),
        "graphs": counters["stats"]["unique_graphs"],
        "inductor": sum(counters["inductor"].values()) > 0,
    }


@pytest.mark.parametrize(
    ("model", "world", "mesh", "graphs"),
    [("mae", 1, "1x1x1", 1), ("vit", 2, "1x2x1", 1)],  # 1x1x1: one whole-model graph; 1x2x1: one block graph
)
def test_trainer_compiles_with_inductor_and_matches_eager(tmp_path, model, world, mesh, graphs):
    argv = [*STEPS, "--mesh", mesh]
    eager = run_ranks(world, train_runs.run, model, [*argv, "--run.dir", str(tmp_path / "eager")], timeout=300)[0]
    compiled = run_ranks(
        world,
        train_with_counters,
        model,
        [*argv, "--parallel.compile", "--run.dir", str(tmp_path / "compiled")],
        timeout=400,
    )[0]
    assert compiled["steps"] == 4 and compiled["inductor"], compiled
    assert compiled["graph_breaks"] == 0 and compiled["graphs"] == graphs, compiled
    # fp32 on CPU: inductor's fused kernels reorder float sums, nothing more
    assert abs(compiled["loss"] - eager["loss"]) <= 1e-4 * max(1.0, abs(eager["loss"])), (compiled, eager)
