"""The optimizer's schedule and parameter groups (ucfvit.train.optim): learning rates by hand, weight
decay that skips biases, norms and what the model names, and layer-wise decay."""

from __future__ import annotations

import pytest

from ucfvit.train.optim import layer_scales, lr_at, param_groups, set_lr
from ucfvit.train.presets import preset


def test_lr_schedule_values():
    cfg = preset("mae", accelerator=False)
    cfg.max_steps, cfg.optim.lr = 110, 1e-3
    cfg.schedule.warmup_steps, cfg.schedule.warmup_start_lr, cfg.schedule.min_lr = 10, 1e-5, 1e-6
    assert lr_at(0, cfg) == pytest.approx(1e-5)
    assert lr_at(5, cfg) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))  # half-way through the cosine
    assert lr_at(110, cfg) == pytest.approx(1e-6)
    cfg.optim.lr_scaling, cfg.data.global_batch_size = "linear", 512
    assert lr_at(10, cfg) == pytest.approx(2e-3)


def test_weight_decay_skips_biases_norms_and_what_the_model_names():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model.register_parameter("token", torch.nn.Parameter(torch.zeros(1, 1, 4)))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(p.shape for p in decay["params"]) == [(1, 1, 4), (4, 4)]
    assert len(no_decay["params"]) == 3  # linear bias, norm weight and bias
    model.no_weight_decay = lambda: {"token"}
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [(4, 4)] and len(no_decay["params"]) == 4


def test_layer_decay_scales_each_block_and_set_lr_applies_it():
    import torch

    from ucfvit.models import build_model

    model = build_model("vit", "debug", img_size=16)  # depth 2
    scales = layer_scales(model, 0.5)
    assert scales["cls_token"] == scales["patch_embed.proj.weight"] == scales["pos_embed"] == 0.125
    assert scales["blocks.0.attn.q.weight"] == 0.25 and scales["blocks.1.mlp.fc2.bias"] == 0.5
    assert scales["norm.weight"] == scales["head.weight"] == 1.0
    optimizer = torch.optim.AdamW(param_groups(model, 0.05, 0.5))
    set_lr(optimizer, 1e-3)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(lr_of) == len(named)
    for name, param in named.items():
        assert lr_of[id(param)] == 1e-3 * scales[name], name
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decays[id(named["blocks.0.attn.q.weight"])] == 0.05 and decays[id(named["blocks.0.attn.q.bias"])] == 0
    named["blocks.0.attn.q.weight"].requires_grad_(False)
    assert sum(len(g["params"]) for g in param_groups(model, 0.05, 0.5)) == len(named) - 1  # frozen: left out
