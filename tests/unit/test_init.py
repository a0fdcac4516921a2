"""Keyed initialisation in one process (ucfvit.models.init): no global random state, the seed picks
the weights, every name keys its own stream, the distributions keep torch's definitions, and any
shard's elements get the values of the whole tensor."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from keyed_init_models import IMG, MODELS, build
from ucfvit.models import build_model
from ucfvit.models.init import KeyedInit


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
