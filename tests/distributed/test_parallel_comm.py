"""Communication per step (CommDebugMode): counts per block and per stack for each parallel layout.

The expected counts are literal numbers worked out from the plan, not read from the code:
a depth-3 debug ViT has 4 FSDP units (3 blocks + the root's own parameters).
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor.debug import CommDebugMode

from rank_runner import run_ranks
from ucfvit.models import build_model
from ucfvit.parallel import make_mesh, parallelize

DEPTH = 3


def _counts(mode: CommDebugMode) -> dict[str, int]:
    return {str(op).split(".")[-1] if "." in str(op) else str(op): n for op, n in mode.get_comm_counts().items()}


def comm_counts(mesh_spec: str, depth: int, options: dict | None = None) -> dict[str, dict[str, int]]:
    """Collectives issued by forward and by backward of a depth-``depth`` debug ViT."""
    torch.set_num_threads(1)
    mesh = make_mesh(mesh_spec)
    torch.manual_seed(0)
    model = build_model("vit", "debug", img_size=(16, 16), depth=depth, num_classes=4)
    parallelize(model, mesh, **(options or {}))
    x = torch.randn(2, 3, 16, 16)
    for _ in range(2):  # the second iteration is the steady state (lazy init happens in the first)
        with CommDebugMode() as fwd:
            loss = model(x).float().pow(2).mean()
        with CommDebugMode() as bwd:
            loss.backward()
        model.zero_grad(set_to_none=True)
    return {"forward": _counts(fwd), "backward": _counts(bwd)}


def test_tensor_parallel_is_two_all_reduces_per_block_each_way():
    counts = run_ranks(2, comm_counts, "1x1x2", DEPTH)[0]
    assert counts == {"forward": {"all_reduce": 6}, "backward": {"all_reduce": 6}}


def test_fsdp_gathers_and_reduce_scatters_per_unit_and_nothing_else():
    counts = run_ranks(2, comm_counts, "1x2x1", DEPTH)[0]
    # forward: all-gather the root + 3 blocks; backward: re-gather blocks 0 and 1 (the last block
    # and the root are not resharded after forward), one reduce-scatter per unit. No all-reduce
    # (a 2-D mesh with a size-1 replicate dim would add one per unit).
    assert counts == {
        "forward": {"_allgather_base_": 4},
        "backward": {"_allgather_base_": 2, "_reduce_scatter_base_": 4},
    }


@pytest.mark.parametrize(("wrap", "units"), [("auto", 1), ("blocks", DEPTH + 1)])
def test_pure_replication_is_one_all_reduce_per_unit(wrap, units):
    # wrap="auto" on a mesh that shards nothing: the root is the only unit, one all-reduce after backward
    counts = run_ranks(2, comm_counts, "2x1x1", DEPTH, {"wrap": wrap})[0]
    assert counts == {"forward": {}, "backward": {"allreduce_": units}}


def _per_block(deep: dict, shallow: dict) -> dict:
    """Collectives per block: the counts of a ``DEPTH``-block model minus those of a ``DEPTH - 1``-block one."""
    return {
        way: {op: n - shallow[way].get(op, 0) for op, n in deep[way].items() if n != shallow[way].get(op, 0)}
        for way in deep
    }


@pytest.mark.parametrize("mesh, world", [("1x1x2", 2), ("2x2x2", 8)])
def test_sequence_parallel_issues_the_megatron_minimum_per_block(mesh, world):
    sp = {"sequence_parallel": True}
    deep, shallow = (run_ranks(world, comm_counts, mesh, d, sp)[0] for d in (DEPTH, DEPTH - 1))
    fsdp = {"forward": {}, "backward": {}}
    if mesh == "2x2x2":  # FSDP per block: gather the unit (again in backward), reduce-scatter, all-reduce over ddp
        fsdp = {
            "forward": {"_allgather_base_": 1},
            "backward": {"_allgather_base_": 1, "_reduce_scatter_base_": 1, "allreduce_": 1},
        }
    # Megatron-SP: the residual stream stays split along tokens between blocks, so a block
    # all-gathers the inputs of attention and MLP and reduce-scatters their outputs, in forward and
    # (transposed) in backward, and nothing more. The 4 all-reduces in backward are the gradients of
    # norm1/norm2's weight and bias, summed over the token shards (Megatron sums them too).
    assert _per_block(deep, shallow) == {
        "forward": {"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2, **fsdp["forward"]},
        "backward": {"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2, "all_reduce": 4, **fsdp["backward"]},
    }
    # Once per stack, not per block: the last block's output is gathered for the final norm and
    # the head, and in backward the gradient of the first block's (sharded) input is gathered.
    tp_only = {
        way: {op: n for op, n in c.items() if op in ("all_gather_into_tensor", "reduce_scatter_tensor")}
        for way, c in deep.items()
    }
    assert tp_only == {
        way: {"all_gather_into_tensor": 2 * DEPTH + 1, "reduce_scatter_tensor": 2 * DEPTH}
        for way in ("forward", "backward")
    }


def test_single_device_issues_no_collective():
    counts = run_ranks(1, comm_counts, "1x1x1", DEPTH)[0]
    assert counts == {"forward": {}, "backward": {}}
