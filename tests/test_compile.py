"""torch.compile through parallelize: one graph for the whole forward where the mesh shards nothing,
one per kind of block otherwise; never a graph break or a recompile once the first step has run.

The graphs are counted by a backend that records what dynamo hands it (tests/compile_cases.py).
Parity of the compiled runs with one process is in test_parallel_parity.py; the trainer with
inductor (C++ kernels generated on this CPU) is in test_train_compile.py."""

from __future__ import annotations

import pytest

from conftest import FAMILIES
from distributed import run_ranks

# Per-block compile: the encoder's blocks share one graph; the transformer decoder blocks of MAE, SAP
# and DiffusionViT (another width) add one.
BLOCK_GRAPHS = {"mae": 2, "sap": 2, "diffusion": 2}
# SAP embeds each quadtree region size with its own resize, and which sizes occur depends on the
# image: the whole forward splits at the two data-dependent operations that find them (3 graphs).
WHOLE_GRAPHS = {"sap": 3}
DATA_DEPENDENT = {"sap": ("aten._unique2", "aten._local_scalar_dense")}


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_model_and_per_block_compile_have_no_graph_breaks_or_recompiles(family):
    # wrap="auto": on pure replication the whole forward is one graph, on FSDP each block is one
    runs = [("2x1x1", "auto"), ("1x2x1", "auto")]
    whole, blocks = run_ranks(2, "compile_cases:graphs_per_step", family, runs, timeout=300)[0]
    # a new step (new RNG words, new data) compiles nothing new
    assert whole["graphs_per_step"] == [WHOLE_GRAPHS.get(family, 1), 0, 0], f"whole-model compile: {whole}"
    assert blocks["graphs_per_step"] == [BLOCK_GRAPHS.get(family, 1), 0, 0], f"per-block compile: {blocks}"
    assert blocks["graph_breaks"] == {}, blocks["graph_breaks"]
    allowed = DATA_DEPENDENT.get(family, ())
    unexpected = [reason for reason in whole["graph_breaks"] if not any(op in reason for op in allowed)]
    assert not unexpected, f"graph breaks in the whole-model compile: {unexpected}"
    assert max(whole["nodes"]) > sum(blocks["nodes"]), "the whole-model graph should hold every block"
