"""Sample order, load balancing and the per-rank step sampler (single process, no files)."""

from __future__ import annotations

import json

import pytest

from ucfvit.data.balance import plan_load
from ucfvit.data.loader import StepSampler, positions_at
from ucfvit.data.order import SampleOrder


def test_order_is_a_permutation_per_epoch_keyed_by_seed_stream_and_epoch():
    order = SampleOrder(10, seed=3, stream=1)
    first, second = [order(g) for g in range(10)], [order(g) for g in range(10, 20)]
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second  # a new order per epoch
    assert [SampleOrder(10, seed=3, stream=1)(g) for g in range(20)] == first + second  # from the key alone
    assert [SampleOrder(10, seed=4, stream=1)(g) for g in range(10)] != first
    assert [SampleOrder(10, seed=3, stream=2)(g) for g in range(10)] != first
    assert [SampleOrder(10, seed=3, shuffle=False)(g) for g in range(12)] == [*range(10), 0, 1]
    assert SampleOrder(None, seed=3)(12345) == 12345  # endless sources: position = sample index
    with pytest.raises(ValueError, match="at least one sample"):
        SampleOrder(0, seed=0)


def test_plan_gives_ranks_in_proportion_and_every_rank_the_same_steps():
    plan = plan_load(["big", "mid", "small"], [6000, 1500, 90], dp_size=8, local_batch=4)
    # D'Hondt minimises the longest pass: 6000/5 = 1200 samples per rank (6, 1, 1 would leave 1500 on "mid").
    assert plan.ranks == (5, 2, 1) and plan.dp_size == 8
    # The epoch is as long as the slowest dataset needs; the others wrap (are reused).
    assert plan.steps_per_epoch(0) == 300 and plan.steps_per_epoch(1) == 188 and plan.steps_per_epoch(2) == 23
    assert plan.epoch_steps == 300
    assert [plan.dataset_of(r) for r in range(8)] == [(0, i) for i in range(5)] + [(1, 0), (1, 1), (2, 0)]
    text = plan.describe()
    assert "big: 6000 samples, 5 rank(s)" in text and "small: 90 samples, 1 rank(s)" in text
    manual = plan_load(["big", "mid", "small"], [6000, 1500, 90], 8, 4, groups=(4, 2, 2))
    assert manual.ranks == (4, 2, 2) and manual.manual
    assert plan_load(["only"], [None], 4, 2).ranks == (4,)


@pytest.mark.parametrize(
    "groups, dp, match",
    [((4, 2), 8, "summing to the data-parallel size"), ((8, 0, 0), 8, "positive"), (None, 2, "at least 3")],
)
def test_plan_refuses_what_cannot_be_balanced(groups, dp, match):
    with pytest.raises(ValueError, match=match):
        plan_load(["a", "b", "c"], [10, 10, 10], dp, 2, groups)


def test_endless_dataset_among_several_needs_groups():
    with pytest.raises(ValueError, match="--data.groups"):
        plan_load(["synthetic", "files"], [None, 10], 4, 2)


def _keys(plan, dp_rank, start, start_step, max_steps, micro):
    return list(StepSampler(plan, dp_rank, start, start_step, max_steps, micro))


def test_step_sampler_shards_one_dataset_by_global_sample_index():
    plan = plan_load(["d"], [1000], dp_size=4, local_batch=6)
    per_rank = [_keys(plan, r, [0], 0, 3, micro=3) for r in range(4)]
    for step in range(3):
        # Micro-batches of rank r at step s: the global batch's rows r*6 .. r*6+5, in order.
        rows = [k for r in range(4) for batch in per_rank[r][2 * step : 2 * step + 2] for k in batch]
        assert rows == [(0, step * 24 + i) for i in range(24)]
    sampler = StepSampler(plan, 1, [0], 0, 3, 3)
    assert len(sampler) == 6
    it = iter(sampler)
    next(it)
    assert sampler.state_dict() == {"done": 1} and len(sampler) == 5


def test_resume_on_another_mesh_continues_the_same_global_stream():
    """Positions are global: a run stopped at step 2 on 4 data-parallel ranks and resumed on 2
    reads exactly what an uninterrupted run on either mesh reads."""
    four = plan_load(["d"], [50], dp_size=4, local_batch=2)
    two = plan_load(["d"], [50], dp_size=2, local_batch=4)
    uninterrupted = [k for r in range(4) for k in _keys(four, r, [0], 0, 5, 2)]
    by_step = sorted(uninterrupted, key=lambda batch: batch[0][1])
    start = positions_at(four, [0], 0, 2)
    assert start == [16]
    resumed = sorted((k for r in range(2) for k in _keys(two, r, start, 2, 5, 2)), key=lambda b: b[0][1])
    assert [key for batch in resumed for key in batch] == [key for batch in by_step[8:] for key in batch]


def test_several_datasets_read_their_own_block_and_wrap():
    plan = plan_load(["big", "small"], [40, 6], dp_size=3, local_batch=2)
    assert plan.ranks == (2, 1)
    big = [k for r in (0, 1) for b in _keys(plan, r, [0, 0], 0, 4, 2) for k in b]
    small = [k for b in _keys(plan, 2, [0, 0], 0, 4, 2) for k in b]
    assert {d for d, _ in big} == {0} and {d for d, _ in small} == {1}
    assert sorted(p for _, p in big) == list(range(16))  # disjoint positions over the dataset's ranks
    assert [p for _, p in small] == list(range(8))  # 8 positions of a 6-sample dataset: it wraps into epoch 1
    assert positions_at(plan, [0, 0], 0, 4) == [16, 8]


def test_several_datasets_come_from_a_config_file_with_ranges_checked_per_dataset(tmp_path):
    from ucfvit.train.config import ConfigError, DatasetConfig, load_config
    from ucfvit.train.ranges import check_ranges

    path = tmp_path / "config.json"
    datasets = {"ct": {"kind": "nifti", "root": str(tmp_path), "tile": [16, 16, 16]}, "sim": {"kind": "npy"}}
    path.write_text(json.dumps({"data": {"datasets": datasets, "groups": [3, 1]}}))
    cfg = load_config(path)
    assert cfg.data.datasets["ct"] == DatasetConfig(kind="nifti", root=tmp_path, tile=(16, 16, 16))
    assert cfg.data.groups == (3, 1) and cfg.data.datasets["sim"].kind == "npy"
    check_ranges(cfg)
    datasets["ct"]["tile_overlap"] = 1.0
    path.write_text(json.dumps({"data": {"datasets": datasets}}))
    with pytest.raises(ConfigError, match=r"data.datasets.ct.tile_overlap=1.0 is out of range"):
        check_ranges(load_config(path))
    path.write_text(json.dumps({"data": {"datasets": {"ct": {"kind": "nifti", "tiles": [1]}}}}))
    with pytest.raises(ConfigError, match="data.datasets.ct.tiles"):
        load_config(path)


@pytest.mark.parametrize("separate", [False, True])
def test_single_channel_models_train_on_each_channel_with_its_own_variable(separate):
    """The trainer's split of a 2-channel batch: each part is one channel under its own name, its
    loss is the model's on that channel alone, and both variables' embeddings get gradients."""
    import torch

    from ucfvit.data.loader import TreePatches
    from ucfvit.models import build_model, get_family
    from ucfvit.train.data_setup import channel_batches

    torch.manual_seed(0)
    model = build_model(
        "sap",
        "debug",
        img_size=(16, 16),
        patch_size=4,
        variables=["ct", "pet"],
        single_channel=True,
        adaptive_patching=True,
        fixed_length=10,
        num_classes=2,
    )
    tree = TreePatches(4, 10, None, (50.0, 150.0), separate_channels=separate)
    images = torch.zeros(2, 2, 16, 16)
    images[:, 0, 2:6, 2:6], images[:, 1, 8:16, 0:12] = 1.0, 1.0  # the channels' edges differ
    samples = [tree({"image": im}) for im in images]
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    batch["seg"] = torch.zeros(2, 16, 16, dtype=torch.long)
    parts = channel_batches(batch, model.variables, separate)
    assert [p["variables"] for p in parts] == [("ct",), ("pet",)]
    loss = get_family("sap").loss
    for c, part in enumerate(parts):
        assert part["image"].shape == (2, 1, 16, 16) and part["patches"].shape == (2, 10, 1, 4, 4)
        if separate:  # its own tree: the layout of that channel alone
            alone = tree({"image": images[0, c : c + 1]})
            assert torch.equal(part["coords"][0], alone["coords"][0])
            assert torch.equal(part["patches"][0], alone["patches"][0])
        else:
            assert torch.equal(part["patches"], batch["patches"][:, :, c : c + 1])
        other = {**part, "variables": (model.variables[1 - c],)}  # the name reaches the model
        assert not torch.allclose(loss(model, part, None, None), loss(model, other, None, None))
    if separate:
        assert not torch.equal(parts[0]["coords"], parts[1]["coords"])
    sum(loss(model, part, None, None) for part in parts).backward()
    grad = model.var_embed.grad
    assert grad.shape[0] == 2 and bool((grad[0] != 0).any()) and bool((grad[1] != 0).any())
