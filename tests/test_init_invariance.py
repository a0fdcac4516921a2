"""A fresh model is the same on every mesh: keyed initialisation (ucfvit.models.init).

Every family (with the options that add parameters of their own) is built on meta, parallelized,
materialised and initialised on meshes 1x1x1, 2x1x1, 1x2x1, 1x1x2 and 2x2x2 (gloo on CPU); its
full state dict must be bitwise that of ``torch.manual_seed(SEED); build_model(...)`` in one
process. The trainer's first loss must not depend on the mesh either, and rank 0 of a 4096-rank
mesh must initialise a ViT-giant with work and memory proportional to its shard.
"""

from __future__ import annotations

import hashlib
import math
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import FAMILIES
from distributed import run_ranks
from ucfvit.models import build_model
from ucfvit.models.init import CHUNK, KeyedInit

SEED = 20260607
IMG = (16, 16)
# Per family: the plain debug model, then one with every option that brings parameters of its own
# (per-variable embeddings and aggregation, LayerScale, q/k norms, learned tables, 3D convs).
MODELS = [
    ("vit", {"num_classes": 3}),  # a (3, D) head: uneven FSDP shards
    ("mae", {}),
    ("unetr", {}),
    ("sap", {}),
    ("diffusion", {}),
    ("vit", {"qk_norm": True, "init_values": 0.1, "pos_embed": "learned", "use_varemb": True,
             "variables": ["a", "b", "c"], "num_classes": 3}),
    ("mae", {"pos_embed": "learned_sincos", "single_channel": True, "variables": ["a", "b"], "init_values": 0.1}),
    ("unetr", {"img_size": [8, 8, 8], "use_varemb": True, "variables": ["a", "b"], "num_classes": 3}),
    ("sap", {"use_adaptive_pos_emb": True, "qk_norm": True}),
    ("diffusion", {"pos_embed": "learned", "use_varemb": True, "variables": ["a", "b", "c"]}),
]  # fmt: skip
MESHES = {1: ["1x1x1"], 2: ["2x1x1", "1x2x1", "1x1x2"], 8: ["2x2x2"]}


def build(family: str, overrides: dict) -> nn.Module:
    return build_model(family, "debug", **{"img_size": IMG, **overrides})


def digests(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """sha256 of every tensor's bytes (with its dtype and shape): bitwise comparison in a few bytes."""
    out = {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        head = f"{t.dtype} {tuple(t.shape)} ".encode()
        out[name] = hashlib.sha256(head + t.view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


# ---------------------------------------------------------------------------------- rank side
def fresh_digests(meshes: list[str], models: list) -> list[dict]:
    """On each mesh, each model built on meta -> parallelize -> to_empty -> seed -> init_weights;
    rank 0 returns the digests of the full state dicts."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from ucfvit.parallel import make_mesh, parallelize

    torch.set_num_threads(1)
    out = []
    for spec in meshes:
        mesh = make_mesh(spec)
        for family, overrides in models:
            with torch.device("meta"):
                model = build(family, overrides)
            parallelize(model, mesh)
            model.to_empty(device="cpu")
            torch.manual_seed(SEED)
            model.init_weights()
            state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
            out.append({"mesh": spec, "family": family, "overrides": overrides, "digests": digests(state)})
    return out if dist.get_rank() == 0 else []


def first_losses(meshes: list[str], run_dir: str) -> list[float]:
    """The trainer's step-1 loss (a fresh MAE run, no init-from: computed before any update) on each mesh."""
    from train_cases import config
    from ucfvit.train.trainer import train

    torch.set_num_threads(1)
    argv = ["--max-steps", "1"]
    return [train(config("mae", [*argv, "--mesh", m, "--run.dir", f"{run_dir}/{m}"])).last_loss for m in meshes]


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages ops create (not views, not in-place results) that are alive at once."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.is_meta:
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in inputs or key in self._sizes or storage.nbytes() == 0:
                continue
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)
        return out


def giant_shard_init() -> dict:
    """Rank 0 of a fake 4096-rank mesh (16x32x8) initialises its shard of a ViT-giant; reports what
    the keyed generator drew per parameter and the peak memory init created."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import ucfvit.models.init as init_module
    from ucfvit.parallel import make_mesh, parallelize

    torch.set_num_threads(1)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4096)
    with torch.device("meta"):
        model = build_model("vit", "giant")
    parallelize(model, make_mesh("16x32x8", device_type="cpu"))
    model.to_empty(device="cpu")
    drawn: dict[str, int] = {}
    original = init_module.keyed_elements

    def counting(seed, name, starts, length, normal):
        noise = original(seed, name, starts, length, normal)
        drawn[name] = drawn.get(name, 0) + noise.numel()
        return noise

    init_module.keyed_elements = counting
    torch.manual_seed(0)
    with _LiveBytes() as memory:
        model.init_weights()
    params = dict(model.named_parameters())
    return {
        "drawn": drawn, "peak_bytes": memory.peak,
        "local": {n: p.to_local().numel() for n, p in params.items()},
        "bytes": {n: p.to_local().numel() * p.element_size() for n, p in params.items()},
        "global": {n: p.numel() for n, p in params.items()},
        "ndim": {n: p.ndim for n, p in params.items()},
        "finite": all(bool(p.to_local().isfinite().all()) for p in params.values()),
    }  # fmt: skip


# ---------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def reference() -> dict:
    """Digests of ``torch.manual_seed(SEED); build_model(...)`` in this process, per model."""
    out = {}
    for family, overrides in MODELS:
        torch.manual_seed(SEED)
        out[(family, repr(overrides))] = digests(build(family, overrides).state_dict())
    return out


def test_every_family_and_option_is_covered():
    assert {family for family, _ in MODELS} == set(FAMILIES)


@pytest.mark.parametrize("world", sorted(MESHES))
def test_fresh_weights_are_bitwise_equal_on_every_mesh(world, reference):
    results = run_ranks(world, "test_init_invariance:fresh_digests", MESHES[world], MODELS, timeout=600)[0]
    assert len(results) == len(MESHES[world]) * len(MODELS)
    for r in results:
        ref = reference[(r["family"], repr(r["overrides"]))]
        assert r["digests"].keys() == ref.keys()
        differ = sorted(k for k in ref if r["digests"][k] != ref[k])
        assert not differ, f"{r['family']} {r['overrides']} on {r['mesh']}: {differ} differ from one process"


def test_first_training_loss_does_not_depend_on_the_mesh(tmp_path):
    losses = {}
    for world, meshes in ((1, ["1x1x1"]), (2, ["1x2x1", "1x1x2"]), (8, ["2x2x2"])):
        found = run_ranks(world, "test_init_invariance:first_losses", meshes, str(tmp_path / str(world)), timeout=600)
        losses.update(zip(meshes, found[0], strict=True))
    one = losses["1x1x1"]
    for loss in losses.values():
        # the same weights, samples and masks; only the order of float sums differs (before: 0.87 on
        # 1x2x1 and 1.07 on 1x1x2 against 1.13 on one rank)
        assert abs(loss - one) <= 1e-5 * abs(one), losses


def test_giant_on_4096_ranks_draws_only_its_shard():
    r = run_ranks(1, "test_init_invariance:giant_shard_init", timeout=600)[0]
    assert r["finite"]
    # every weight, token and table (ndim >= 2) is random; biases and norms are constants
    random = {n for n, d in r["ndim"].items() if d >= 2}
    assert set(r["drawn"]) == random
    for name in random:
        assert r["drawn"][name] == r["local"][name], name  # its own shard, each element once
    local, whole = sum(r["local"][n] for n in random), sum(r["global"][n] for n in random)
    assert sum(r["drawn"].values()) == local and whole > 1e9 and local < whole / 200
    # peak memory of everything init creates: a fixed bound per chunk (~40 bytes an element), no
    # more than the largest shard besides, far below the whole model
    bound = max(r["bytes"].values()) + 64 * CHUNK["cpu"]
    assert r["peak_bytes"] <= bound, (r["peak_bytes"], bound)


# ---------------------------------------------------------------------------------- one process
@pytest.mark.parametrize("family, overrides", MODELS)
def test_init_uses_no_global_random_state(family, overrides):
    model = build(family, overrides)
    before = torch.get_rng_state()
    model.init_weights()
    assert torch.equal(torch.get_rng_state(), before), "init_weights drew from torch's global RNG"


def test_seed_picks_the_weights():
    torch.manual_seed(3)
    a = build_model("mae", "debug", img_size=IMG).state_dict()
    b = build_model("mae", "debug", img_size=IMG).state_dict()
    torch.manual_seed(4)
    c = build_model("mae", "debug", img_size=IMG).state_dict()
    model = build_model("mae", "debug", img_size=IMG)
    model.init_weights(seed=3)
    for name, value in a.items():
        assert torch.equal(value, b[name]) and torch.equal(value, model.state_dict()[name]), name
        if value.unique().numel() > 1:
            assert not torch.equal(value, c[name]), name
    # two tensors of the same shape get different values
    assert not torch.equal(a["blocks.0.attn.q.weight"], a["blocks.0.attn.k.weight"])


def test_every_name_keys_its_own_stream():
    from ucfvit.models.rng import name_words

    with torch.device("meta"):
        names = [n for n, _ in build_model("mae", "giant").named_parameters()]
    names += ["", "a", "a\0", "\0", "b" * 8, "b" * 9]  # lengths and padding are part of the key
    assert len({name_words(n) for n in names}) == len(names)


def test_a_parameter_without_a_keyed_rule_fails_init():
    model = build_model("vit", "debug", img_size=IMG)
    model.extra = nn.Embedding(4, 8)  # torch would draw it from the global RNG
    with pytest.raises(RuntimeError, match=r"\['extra.weight'\]"):
        model.init_weights()


class _Holder(nn.Module):
    def __init__(self, *shapes):
        super().__init__()
        self.tensors = nn.ParameterList(nn.Parameter(torch.empty(s)) for s in shapes)


def test_distributions_keep_their_definitions():
    big = (512, 384)
    holder = _Holder(big, big, big, big)
    init = KeyedInit(holder, seed=0)
    u, z, tn, tn_wide = holder.tensors
    bound = math.sqrt(6.0 / sum(big))
    init.uniform_(u, -bound, bound)
    assert u.min() >= -bound and u.max() < bound
    assert abs(u.mean()) < 1e-3 and abs(u.std() / (bound / math.sqrt(3)) - 1) < 0.01
    init.normal_(z, std=0.02)
    assert abs(z.mean()) < 1e-4 and abs(z.std() / 0.02 - 1) < 0.01
    init.trunc_normal_(tn, std=1.0, a=-1.0, b=2.0)  # as torch: absolute bounds, inverse CDF
    ref = nn.init.trunc_normal_(torch.empty(big), std=1.0, a=-1.0, b=2.0)
    assert tn.min() >= -1.0 and tn.max() <= 2.0
    assert abs(tn.mean() - ref.mean()) < 0.01 and abs(tn.std() / ref.std() - 1) < 0.01
    init.trunc_normal_(tn_wide, std=0.02)
    assert abs(tn_wide.std() / 0.02 - 1) < 0.01
    # torch's defaults of a (transposed) convolution, fans from the whole weight
    for conv in (nn.Conv2d(16, 32, 3), nn.ConvTranspose3d(32, 8, 2, stride=2)):
        fan_in = conv.weight.shape[1] * math.prod(conv.weight.shape[2:])
        weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()  # torch's own draw
        KeyedInit(conv, seed=0).reset_(conv)
        for mine, torchs in ((conv.weight, weight), (conv.bias, bias)):
            bound = (1 + 1e-6) / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) and the bias: 1/sqrt(fan_in)
            assert mine.abs().max() <= bound and torchs.abs().max() <= bound
            assert mine.abs().max() > 0.9 / math.sqrt(fan_in) or mine.numel() < 64
            assert not torch.equal(mine, torchs)


@pytest.mark.parametrize("normal", [False, True])
def test_any_set_of_elements_gets_the_values_of_the_whole_tensor(normal, monkeypatch):
    """A shard given by any per-dim index sets (contiguous or not, any alignment to the generator's
    blocks of 4) holds exactly the whole tensor's values there, also across chunk boundaries."""
    import ucfvit.models.init as init_module

    shape = (7, 6, 5)
    whole = _Holder(shape)
    KeyedInit(whole, seed=9)._draw_(whole.tensors[0], normal, lambda x: x)
    whole = whole.tensors[0].detach()
    monkeypatch.setitem(init_module.CHUNK, "cpu", 8)  # many chunks, rows split across them
    for index in [
        (torch.arange(2, 5), torch.arange(6), torch.arange(5)),  # rows: one run
        (torch.arange(7), torch.arange(1, 4), torch.arange(5)),  # a middle dim: a run per row
        (torch.arange(7), torch.arange(6), torch.tensor([0, 1, 3])),  # a broken run: per element
        (torch.tensor([0, 2, 6]), torch.tensor([5]), torch.arange(1, 5)),
    ]:
        holder = _Holder(shape)
        param = holder.tensors[0]
        local = torch.full([len(i) for i in index], float("nan"))
        param.device_mesh, param.placements = None, ()  # looks like a DTensor to the model side
        monkeypatch.setattr(init_module, "_shard_index", lambda t, local=local, index=index: (local, index))
        KeyedInit(holder, seed=9)._draw_(param, normal, lambda x: x)
        expected = whole[index[0]][:, index[1]][:, :, index[2]]
        assert torch.equal(local, expected), index
