"""torch.compile through parallelize: one graph for the whole forward where the mesh shards nothing,
one per kind of block otherwise; never a graph break or a recompile once the first step has run.

The graphs are counted by a backend that records what dynamo hands it. Parity of the compiled runs
with one process is in test_parallel_parity.py; the trainer with inductor (C++ kernels generated on
this CPU) is in tests/e2e/test_train_compile.py."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo import register_backend
from torch._dynamo.utils import counters

from conftest import FAMILIES
from parity import GLOBAL_BATCH, SEED, build, global_data, loss_fn
from rank_runner import run_ranks
from ucfvit.models import SampleRNG
from ucfvit.parallel import local_batch_range, make_mesh, parallelize

# Per-block compile: the encoder's blocks share one graph; the transformer decoder blocks of MAE, SAP
# and DiffusionViT (another width) add one.
BLOCK_GRAPHS = {"mae": 2, "sap": 2, "diffusion": 2}
# SAP embeds each quadtree region size with its own resize, and which sizes occur depends on the
# image: the whole forward splits at the two data-dependent operations that find them (3 graphs).
WHOLE_GRAPHS = {"sap": 3}
DATA_DEPENDENT = {"sap": ("aten._unique2", "aten._local_scalar_dense")}

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


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_model_and_per_block_compile_have_no_graph_breaks_or_recompiles(family):
    # wrap="auto": on pure replication the whole forward is one graph, on FSDP each block is one
    runs = [("2x1x1", "auto"), ("1x2x1", "auto")]
    whole, blocks = run_ranks(2, graphs_per_step, family, runs, timeout=300)[0]
    # a new step (new RNG words, new data) compiles nothing new
    assert whole["graphs_per_step"] == [WHOLE_GRAPHS.get(family, 1), 0, 0], f"whole-model compile: {whole}"
    assert blocks["graphs_per_step"] == [BLOCK_GRAPHS.get(family, 1), 0, 0], f"per-block compile: {blocks}"
    assert blocks["graph_breaks"] == {}, blocks["graph_breaks"]
    allowed = DATA_DEPENDENT.get(family, ())
    unexpected = [reason for reason in whole["graph_breaks"] if not any(op in reason for op in allowed)]
    assert not unexpected, f"graph breaks in the whole-model compile: {unexpected}"
    assert max(whole["nodes"]) > sum(blocks["nodes"]), "the whole-model graph should hold every block"
