"""The counter-based noise of ucfvit.models.rng: known answers, split invariance, statistics,
cost proportional to the local batch, and graph-break-free compilation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from ucfvit.models import DDPMScheduler, SampleRNG, build_model
from ucfvit.models.rng import DATA_STREAM, keyed_rand, philox4x32, rand, randn

# Random123's published known-answer vectors for Philox4x32-10: (counter, key, output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_matches_the_random123_known_answers(counter, key, expected):
    assert philox4x32(counter, key) == expected  # Python ints
    as_tensors = philox4x32([torch.tensor(c) for c in counter], [torch.tensor(k) for k in key])
    assert tuple(int(w) for w in as_tensors) == expected  # int64 tensors, the path the noise takes


@pytest.mark.parametrize("draw", [rand, randn])
@pytest.mark.parametrize("rest", [(1,), (5,), (3, 5, 7), (2, 9, 9)])
def test_rows_are_bitwise_equal_however_the_batch_is_split(draw, rest):
    total = 11
    whole = draw(SampleRNG(3, 7, 0, total), (total, *rest), "cpu")
    for start, stop in [(0, 1), (1, 4), (4, 11), (5, 6), (2, 9)]:
        part = draw(SampleRNG(3, 7, start, total), (stop - start, *rest), "cpu")
        assert torch.equal(part, whole[start:stop]), (start, stop)


def test_seeds_steps_sites_and_samples_get_different_noise():
    base = SampleRNG(0, 0, 0, 8)
    a, site1 = base.rand((8, 64), "cpu"), base.rand((8, 64), "cpu")
    others = [site1, SampleRNG(1, 0, 0, 8).rand((8, 64), "cpu"), SampleRNG(0, 1, 0, 8).rand((8, 64), "cpu")]
    for other in others:
        assert (a != other).float().mean() > 0.99
    assert (a[:-1] != a[1:]).float().mean() > 0.99  # neighbouring samples
    shifted = SampleRNG(0, 0, 1, 9).rand((8, 64), "cpu")
    assert torch.equal(shifted[:-1], a[1:])  # keyed by global sample index, not by row
    # data streams never meet the model's sites, even with the same seed
    assert (keyed_rand(0, 0, DATA_STREAM, (8, 64)) != a).float().mean() > 0.99


def test_uniforms_have_24_bits_in_0_1_and_normals_are_standard():
    rng = SampleRNG(5, 1, 0, 64)
    u = rng.rand((64, 16384), "cpu")
    assert u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1
    assert torch.equal(u * 2**24, (u * 2**24).floor())  # multiples of 2**-24
    assert u.unique().numel() > 0.9 * u.numel()  # ~1M values from 2**24: few repeats
    n = u.numel()
    assert abs(u.mean() - 0.5) < 4 * math.sqrt(1 / 12 / n) and abs(u.var() - 1 / 12) < 1e-3
    counts = torch.histc(u, bins=64, min=0, max=1)
    expected = n / 64
    assert ((counts - expected).abs() < 5 * math.sqrt(expected)).all()

    z, z2 = rng.randn((64, 16384), "cpu"), rng.randn((64, 16384), "cpu")
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    assert abs(z.mean()) < 5e-3 and abs(z.std() - 1) < 5e-3
    assert abs(z.pow(4).mean() - 3) < 0.05  # normal kurtosis
    assert abs((z.abs() < 1).float().mean() - 0.6827) < 3e-3

    bound = 5 / math.sqrt(n)  # |correlation| of independent streams is ~1/sqrt(n)
    pairs = {
        "adjacent samples": (z[:-1], z[1:]),
        "adjacent elements": (z[:, :-1], z[:, 1:]),
        "box-muller partners": (z[:, 0::2], z[:, 1::2]),
        "successive sites": (z, z2),
        "a uniform site and the next site": (u, z),
    }
    for name, (a, b) in pairs.items():
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(corr) < bound, f"{name}: correlation {corr:.2e}"


def test_each_call_is_one_site_and_generator_sources_still_work():
    rng = SampleRNG(0, 0, 0, 4)
    first, second = rng.randn((4, 8), "cpu"), rng.rand((4, 8), "cpu")
    again = SampleRNG(0, 0, 0, 4)
    assert torch.equal(again.randn((4, 8), "cpu"), first) and torch.equal(again.rand((4, 8), "cpu"), second)
    g = torch.Generator().manual_seed(0)
    assert rand(g, (3, 2), "cpu").shape == (3, 2) and randn(None, (3, 2), "cpu").shape == (3, 2)
    assert rand(SampleRNG(0, 0, 0, 4), (2, 3), "meta").device.type == "meta"
    with pytest.raises(ValueError, match="exceeds the global batch"):
        SampleRNG(0, 0, 2, 4).rand((3, 1), "cpu")
    with pytest.raises(ValueError, match="must lie in"):
        SampleRNG(0, 0, 4, 4)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op creates (numel)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_noise_costs_the_local_batch_on_4096_ranks(monkeypatch):
    """Rank 0 of a fake 16x32x8 mesh, global batch 4096: local batch 4096 / (16*32) = 8. Every
    tensor a draw creates is at most the local batch's noise (before: the global batch's, 512x)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from ucfvit.models import get_family
    from ucfvit.parallel import make_mesh, sample_rng

    if dist.is_initialized():
        pytest.skip("needs a fresh process group")
    global_batch, img = 4096, (32, 32)
    draws = []  # (shape, largest tensor created while drawing it)
    original = SampleRNG._next

    def recording(self, shape, device, normal):
        with _LargestTensor() as mode:
            out = original(self, shape, device, normal)
        draws.append((tuple(shape), mode.largest))
        return out

    monkeypatch.setattr(SampleRNG, "_next", recording)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4096)
    try:
        mesh = make_mesh("16x32x8", device_type="cpu")
        rng = sample_rng(mesh, seed=0, step=3, global_batch=global_batch)
        local = 8
        assert rng.start == 0 and rng.total == global_batch
        x = torch.randn(local, 3, *img)
        batch = {"image": x, "label": torch.zeros(local, dtype=torch.long), "seg": None}
        mae = build_model("mae", "debug", img_size=img, drop_path_rate=0.1).train()
        get_family("mae").loss(mae, batch, rng, None)  # masks + drop path
        diffusion = build_model("diffusion", "debug", img_size=img, drop_path_rate=0.1).train()
        get_family("diffusion").loss(diffusion, batch, sample_rng(mesh, 0, 3, global_batch), DDPMScheduler(1000))
    finally:
        dist.destroy_process_group()

    assert {s for s, _ in draws} >= {(local, 3, *img), (local,), (local, mae.num_patches)}
    for shape, largest in draws:
        per_sample = math.prod(shape[1:])
        assert shape[0] == local
        assert largest <= local * 4 * math.ceil(per_sample / 4), (shape, largest)  # one word per element
        before = global_batch * per_sample  # the old draw: the whole global batch, then a slice
        assert before >= 512 * local * per_sample
    largest = max(n for _, n in draws)
    assert largest == local * 3 * math.prod(img)  # the diffusion noise itself; before: 4096 * 3 * 32 * 32


def test_mae_forward_compiles_without_graph_breaks_or_recompiles():
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    model = build_model("mae", "debug", img_size=(16, 16), drop_path_rate=0.1).train()
    x = torch.randn(4, 3, 16, 16)
    explanation = torch._dynamo.explain(model)(x, rng=SampleRNG(0, 3, 4, 16))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for seed, step, start in [(0, 3, 4), (0, 4, 4), (0, 4, 12), (9, 4, 0)]:  # new step, rank, seed
        pred, mask = compiled(x, rng=SampleRNG(seed, step, start, 16))
        ref_pred, ref_mask = model(x, rng=SampleRNG(seed, step, start, 16))
        assert torch.equal(mask, ref_mask)
        torch.testing.assert_close(pred, ref_pred)
    assert counter.frame_count == 1, "a new step, rank or seed recompiled the forward"


def test_synthetic_data_indices_beyond_32_bits_stay_distinct():
    from ucfvit.data import SyntheticImages

    data = SyntheticImages((8, 8), in_chans=1, num_classes=3, seed=2)
    low, high = data.sample(7)["image"], data.sample(2**32 + 7)["image"]
    assert not torch.equal(low, high) and torch.equal(high, data.sample(2**32 + 7)["image"])
