"""Worker side of the compile tests: graphs, graph breaks and recompiles of the training step."""

from __future__ import annotations

import torch
from torch._dynamo import register_backend
from torch._dynamo.utils import counters

from parity_cases import GLOBAL_BATCH, SEED, build, global_data, loss_fn
from ucfvit.models import SampleRNG
from ucfvit.parallel import local_batch_range, make_mesh, parallelize

_GRAPHS: list[int] = []  # one entry per graph dynamo hands to the backend: its number of FX nodes


@register_backend(name="ucfvit_count_graphs")
def _count_graphs(gm: torch.fx.GraphModule, example_inputs):
    _GRAPHS.append(len(gm.graph.nodes))
    return gm.forward  # run the captured graph eagerly


def graphs_per_step(family: str, runs: list[tuple[str, str]], steps: int = 3) -> list[dict]:
    """:func:`graphs_of` for each ``(mesh_spec, wrap)`` of ``runs``, in one process group."""
    torch.set_num_threads(1)
    return [graphs_of(family, mesh_spec, wrap, steps) for mesh_spec, wrap in runs]


def graphs_of(family: str, mesh_spec: str, wrap: str, steps: int) -> dict:
    """Train ``steps`` steps of the debug ``family`` compiled by parallelize on ``mesh_spec``, with a
    new step (so new SampleRNG words) each time; report the graphs compiled in each step and the
    graph breaks dynamo counted."""
    torch._dynamo.reset()
    counters.clear()
    _GRAPHS.clear()
    mesh = make_mesh(mesh_spec)
    model = build(family)
    parallelize(model, mesh, compile="ucfvit_count_graphs", wrap=wrap)
    rows = local_batch_range(mesh, GLOBAL_BATCH)
    per_step = []
    for step in range(steps):
        before = len(_GRAPHS)
        data = {k: v[rows.start : rows.stop] for k, v in global_data(step).items()}
        loss_fn(family, model, data, SampleRNG(SEED, step, rows.start, GLOBAL_BATCH)).backward()
        model.zero_grad(set_to_none=True)
        per_step.append(len(_GRAPHS) - before)
    return {
        "graphs_per_step": per_step,
        "graph_breaks": {str(k): v for k, v in counters["graph_break"].items()},
        "nodes": list(_GRAPHS),
    }


def train_with_counters(model: str, argv: list[str]) -> dict:
    """Run the trainer (train_cases.config) and report its last loss and what dynamo compiled."""
    from train_cases import config
    from ucfvit.train.trainer import train

    torch._dynamo.reset()
    counters.clear()
    result = train(config(model, argv))
    return {
        "steps": result.steps_done, "loss": result.last_loss,
        "graph_breaks": sum(counters["graph_break"].values()), "graphs": counters["stats"]["unique_graphs"],
        "inductor": sum(counters["inductor"].values()) > 0,
    }  # fmt: skip
