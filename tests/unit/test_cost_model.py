"""The cost model of benchmarks/simulate.py (ucfvit.parallel.cost_model): which mesh dimensions stay
inside a node, and the time of collectives and of a step, by hand."""

from __future__ import annotations

import pytest

from ucfvit.parallel import MeshShape
from ucfvit.parallel.cost_model import CLUSTERS, collective_seconds, dims_within_node, step_time


def test_groups_inside_a_node():
    assert dims_within_node(MeshShape(2, 4, 8), 8) == {"ddp": False, "fsdp": False, "tp": True, "world": False}
    assert dims_within_node(MeshShape(4, 2, 4), 8) == {"ddp": False, "fsdp": True, "tp": True, "world": False}
    assert dims_within_node(MeshShape(1, 8, 1), 8) == {"ddp": True, "fsdp": True, "tp": True, "world": True}
    # tp=16 crosses nodes of 8; tp=3 does not divide 8, so some groups straddle two nodes
    assert dims_within_node(MeshShape(1, 1, 16), 8)["tp"] is False
    assert dims_within_node(MeshShape(1, 4, 3), 8)["tp"] is False  # ranks 6, 7 | 8


def test_cost_model_arithmetic():
    frontier = CLUSTERS["frontier"]
    shape = MeshShape(2, 4, 8)  # tp inside a node, fsdp between nodes
    tp = dict(
        phase="forward_backward",
        dims="tp",
        op="all_reduce",
        functional=True,
        group_size=8,
        ring_steps=14,
        count=10,
        sent_bytes=50e9,
    )
    fsdp = dict(
        phase="forward_backward",
        dims="fsdp",
        op="all_gather",
        functional=False,
        group_size=4,
        ring_steps=3,
        count=2,
        sent_bytes=12.5e9,
    )
    assert collective_seconds(tp, shape, frontier) == pytest.approx(10 * 14 * 5e-6 + 1.0)  # 50 GB/s inside
    assert collective_seconds(fsdp, shape, frontier) == pytest.approx(2 * 3 * 10e-6 + 1.0)  # 12.5 GB/s between
    pair = {**tp, "group_size": 2, "ring_steps": 2}
    assert collective_seconds(pair, MeshShape(8, 4, 2), frontier) == pytest.approx(10 * 2 * 5e-6 + 0.25)  # one MI250X
    flops = 0.5 * 191.5e12 * 0.40  # half a second of compute
    t = step_time([tp, fsdp], flops, shape, frontier, global_batch=64)
    # tp is waited for, fsdp (1.00006 s) overlaps the 0.5 s of compute and shows only beyond it
    assert t["compute_s"] == pytest.approx(0.5)
    assert t["step_s"] == pytest.approx(0.5 + (10 * 14 * 5e-6 + 1.0) + (2 * 3 * 10e-6 + 1.0 - 0.5))
    assert t["samples_per_s"] == pytest.approx(64 / t["step_s"])
    # the root as the only FSDP unit (wrap="model"): its collectives come before forward and after
    # backward, so they are waited for in full
    whole = step_time([tp, fsdp], flops, shape, frontier, global_batch=64, fsdp_overlaps=False)
    assert whole["step_s"] == pytest.approx(0.5 + (10 * 14 * 5e-6 + 1.0) + (2 * 3 * 10e-6 + 1.0))
