"""parallelize()'s pieces that need no ranks: mesh parsing, plan patterns that match one segment per
star and never silently nothing, and the dimension FSDP shards a short tensor on. On ranks:
tests/distributed/test_parallel_api.py; refusals before any mesh: test_parallel_check.py."""

from __future__ import annotations

import pytest

from ucfvit.models import build_model
from ucfvit.parallel import MeshShape, parse_mesh


def test_parse_mesh_accepts_strings_and_tuples():
    assert parse_mesh("2x2x2") == parse_mesh((2, 2, 2)) == MeshShape(2, 2, 2)
    assert parse_mesh("1X4x2", world_size=8).dp_size == 4


def test_plan_patterns_match_one_segment_per_star_and_never_silently_nothing():
    from ucfvit.parallel.plans import match_modules

    model = build_model("mae", "debug")
    hits = match_modules(model, ["blocks.*.attn.q", "decoder_blocks.*"])
    assert [n for n, _ in hits["blocks.*.attn.q"]] == ["blocks.0.attn.q", "blocks.1.attn.q"]
    assert [n for n, _ in hits["decoder_blocks.*"]] == ["decoder_blocks.0"]
    with pytest.raises(ValueError, match=r"'layers\.\*\.wq' matches no module of MAE"):
        match_modules(model, ["layers.*.wq"])


def test_fsdp_shards_short_tensors_on_a_dim_it_can_split():
    """dim 0 shorter than the shard count: the longest dim if the count divides it (pos_embed,
    cls_token), else dim 0 (FSDP pads dim 0 only; a 3-class head on 8192 ranks once failed)."""
    import torch
    from torch.distributed.tensor import Shard

    from ucfvit.parallel.parallelize import _shard_placement

    assert _shard_placement(torch.empty(1, 256, 64), 32) == Shard(1)
    assert _shard_placement(torch.empty(1, 1, 64), 8) == Shard(2)
    assert _shard_placement(torch.empty(3, 12288), 8192) is None
    assert _shard_placement(torch.empty(4096, 8), 8192) is None  # longest is dim 0 itself
    assert _shard_placement(torch.empty(64, 8), 8) is None  # dim 0 long enough
