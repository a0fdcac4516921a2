"""Communication per step (CommDebugMode) and parameter memory per rank at 4096 ranks (fake PG).

The expected counts are literal numbers worked out from the plan, not read from the code:
a depth-3 debug ViT has 4 FSDP units (3 blocks + the root's own parameters).
"""

from __future__ import annotations

import pytest

from distributed import run_ranks

DEPTH = 3


def test_tensor_parallel_is_two_all_reduces_per_block_each_way():
    counts = run_ranks(2, "comm_cases:comm_counts", "1x1x2", DEPTH)[0]
    assert counts == {"forward": {"all_reduce": 6}, "backward": {"all_reduce": 6}}


def test_fsdp_gathers_and_reduce_scatters_per_unit_and_nothing_else():
    counts = run_ranks(2, "comm_cases:comm_counts", "1x2x1", DEPTH)[0]
    # forward: all-gather the root + 3 blocks; backward: re-gather blocks 0 and 1 (the last block
    # and the root are not resharded after forward), one reduce-scatter per unit. No all-reduce
    # (a 2-D mesh with a size-1 replicate dim would add one per unit).
    assert counts == {
        "forward": {"_allgather_base_": 4},
        "backward": {"_allgather_base_": 2, "_reduce_scatter_base_": 4},
    }


def test_pure_replication_is_one_all_reduce_per_unit():
    counts = run_ranks(2, "comm_cases:comm_counts", "2x1x1", DEPTH)[0]
    assert counts == {"forward": {}, "backward": {"allreduce_": 4}}


def test_single_device_issues_no_collective():
    counts = run_ranks(1, "comm_cases:comm_counts", "1x1x1", DEPTH)[0]
    assert counts == {"forward": {}, "backward": {}}


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(embed_dim=5120, depth=48, num_heads=40)],  # ViT-H/14 (632M) and a 15.1B ViT
    ids=["vit-huge", "vit-15b"],
)
def test_parameter_bytes_per_rank_on_4096_ranks(overrides):
    """Built on meta, parallelized on 16x32x8: each rank holds ~1/(fsdp*tp) of the parameters."""
    r = run_ranks(1, "benchmarks.memory_per_rank:simulate", "16x32x8", "vit", "huge", kwargs=overrides)[0]
    assert r["params"] > (10e9 if overrides else 6e8)
    ideal = r["params"] * 4 / (32 * 8)
    assert abs(r["bytes_per_rank"] - ideal) / ideal < 0.05, r
