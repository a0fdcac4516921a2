"""Encoder options (qk_norm, LayerScale, dropouts, pooling, position tables), reference position
tables and initialisation, and variables in diffusion and SAP (weight conversion: test_interop.py).
The options on a sharded mesh: tests/distributed/test_options.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import FAMILIES, IMG, make_inputs, output_tensor
from reference_models import mae_2d_table, ucfvit_3d_table
from ucfvit.models import DDPMScheduler, build_model, grid_patches
from ucfvit.models.embed import resize_pos_embed

OFF = {"qk_norm": False, "init_values": None, "attn_drop_rate": 0.0, "proj_drop_rate": 0.0, "pos_drop_rate": 0.0}
ON = {"qk_norm": True, "init_values": 0.1, "attn_drop_rate": 0.2, "proj_drop_rate": 0.2, "pos_drop_rate": 0.2}


def _run(model, x, seed=0):
    args, kwargs = make_inputs(model, x)
    return output_tensor(model(*args, **kwargs, rng=torch.Generator().manual_seed(seed)))


def _pair(name, **kwargs):
    """Two models with the same weights: defaults, and defaults plus ``kwargs``."""
    torch.manual_seed(0)
    base = build_model(name, "debug", img_size=IMG[2], drop_path_rate=0.1)
    torch.manual_seed(0)
    other = build_model(name, "debug", img_size=IMG[2], drop_path_rate=0.1, **kwargs)
    other.load_state_dict(base.state_dict(), strict=False)
    return base, other


# ---------------------------------------------------------------- defaults change nothing
@pytest.mark.parametrize("name", FAMILIES)
def test_defaults_equal_every_option_explicitly_off(name):
    vit_off = {"global_pool": "token", "fc_norm": False, "patch_drop_rate": 0.0}
    off = {**OFF, **(vit_off if name == "vit" else {})}
    base, explicit = _pair(name, **off)
    assert base.state_dict().keys() == explicit.state_dict().keys()
    for (n, a), (_, b) in zip(base.state_dict().items(), explicit.state_dict().items(), strict=True):
        assert torch.equal(a, b), n  # same initialisation, nothing added
    x = torch.randn(2, 3, *IMG[2])
    torch.testing.assert_close(_run(base.train(), x), _run(explicit.train(), x), rtol=0, atol=0)


# ---------------------------------------------------------------- each option acts
@pytest.mark.parametrize("option", ["qk_norm", "init_values"])
def test_parameter_options_change_the_output(option):
    value = ON[option]
    base, other = _pair("vit", **{option: value})
    if option == "init_values":
        assert all(b.ls1.gamma.eq(value).all() and b.ls2.gamma.eq(value).all() for b in other.blocks)
    else:
        assert {"blocks.0.attn.q_norm.bias", "blocks.0.attn.k_norm.weight"} <= other.state_dict().keys()
        assert other.blocks[0].attn.k_norm.bias is None  # softmax cancels a key-side bias
        with torch.no_grad():  # a norm with a non-trivial affine map, so its effect is visible
            for block in other.blocks:
                block.attn.q_norm.weight.mul_(3.0)
    x = torch.randn(2, 3, *IMG[2])
    assert not torch.allclose(_run(base.eval(), x), _run(other.eval(), x), atol=1e-4)


@pytest.mark.parametrize("option", ["attn_drop_rate", "proj_drop_rate", "pos_drop_rate", "patch_drop_rate"])
def test_dropouts_act_in_training_follow_the_rng_and_are_off_in_eval(option):
    base, other = _pair("vit", **{option: 0.3})
    x = torch.randn(4, 3, *IMG[2])
    a, b = _run(other.train(), x, seed=1), _run(other.train(), x, seed=1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, _run(other, x, seed=2), atol=1e-4)
    assert not torch.allclose(a, _run(base.train(), x, seed=1), atol=1e-4)
    torch.testing.assert_close(_run(other.eval(), x, seed=1), _run(base.eval(), x, seed=1), rtol=0, atol=0)


def test_attention_dropout_zeroes_probabilities_with_the_expected_rate():
    from ucfvit.models.layers import attention

    q, k = torch.randn(2, 4, 50, 8), torch.randn(2, 4, 50, 8)
    v = torch.eye(50).expand(2, 4, 50, 50)  # identity values: the output is the probability matrix
    probs = attention(q, k, v, "math")
    scale = (torch.rand(2, 4, 50, 50) >= 0.25).float() / 0.75
    dropped = attention(q, k, v, "sdpa", prob_scale=scale)  # explicit path whatever the backend
    torch.testing.assert_close(dropped, probs * scale)
    assert abs((dropped == 0).float().mean().item() - 0.25) < 0.02


def test_patch_dropout_keeps_prefix_and_the_reference_number_of_patches():
    model = build_model("vit", "debug", img_size=IMG[2], patch_drop_rate=0.5).train()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    model(torch.randn(2, 3, *IMG[2]))
    assert seen == [1 + max(1, int(model.num_patches * 0.5))]
    model.eval()(torch.randn(2, 3, *IMG[2]))
    assert seen[-1] == 1 + model.num_patches


def test_avg_pooling_with_fc_norm_and_without():
    torch.manual_seed(0)
    x = torch.randn(2, 3, *IMG[2])
    avg = build_model("vit", "debug", img_size=IMG[2], global_pool="avg").eval()  # keeps its class token
    assert avg.use_fc_norm and isinstance(avg.norm, torch.nn.Identity) and "fc_norm.weight" in avg.state_dict()
    raw = avg.encode(avg.embed(x), avg.patch_coords(2, x.device))[0]  # un-normalised block output
    torch.testing.assert_close(avg(x), avg.head(avg.fc_norm(raw[:, 1:].mean(1))))
    plain = build_model("vit", "debug", img_size=IMG[2], class_token=False, fc_norm=False).eval()
    assert plain.global_pool == "avg" and "norm.weight" in plain.state_dict()  # ucfvit's former pooling
    tokens = plain.forward_features(x)
    torch.testing.assert_close(plain(x), plain.head(tokens.mean(1)))
    assert build_model("vit", "debug", class_token=False).use_fc_norm  # timm's default for avg
    assert build_model("vit", "debug").global_pool == "token"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"class_token": False, "global_pool": "token"}, "global_pool='token' needs class_token=True"),
        ({"global_pool": "max"}, "global_pool='max' is unknown"),
        ({"attn_drop_rate": 1.0}, r"attn_drop_rate=1.0 must lie in \[0, 1\)"),
        ({"patch_drop_rate": -0.1}, "patch_drop_rate"),
        ({"pos_embed": "learn"}, "pos_embed='learn' is unknown.*learned_sincos"),
    ],
)
def test_bad_option_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model("vit", "debug", **kwargs)


# ---------------------------------------------------------------- position tables


def test_2d_sincos_tables_equal_mae_and_3d_equal_ucfvit():
    kw = {"patch_size": 4, "embed_dim": 48, "num_heads": 8, "decoder_embed_dim": 48, "decoder_num_heads": 8}
    mae = build_model("mae", "debug", img_size=(12, 20), **kw)  # 3 x 5 patches: rows and columns differ
    ref = mae_2d_table(48, 3, 5)
    assert ref[0].abs().max() == 0  # MAE's class slot is zero; ucfvit's table has no class row
    for table in (mae.pos_embed, mae.decoder_pos_embed):
        assert table.shape == (1, 15, 48)
        assert (table[0].double() - ref[1:]).abs().max() < 1e-6
    mae3 = build_model("mae", "debug", img_size=(8, 12, 16), **kw)  # 2 x 3 x 4 patches
    ref3 = ucfvit_3d_table(48, 2, 3, 4)
    for table in (mae3.pos_embed, mae3.decoder_pos_embed):
        assert (table[0].double() - ref3).abs().max() < 1e-6


def test_learned_sincos_starts_at_the_table_and_learns():
    a = build_model("mae", "debug", img_size=IMG[2])
    b = build_model("mae", "debug", img_size=IMG[2], pos_embed="learned_sincos")
    assert isinstance(b.pos_embed, torch.nn.Parameter) and isinstance(b.decoder_pos_embed, torch.nn.Parameter)
    assert torch.equal(b.pos_embed, a.pos_embed) and torch.equal(b.decoder_pos_embed, a.decoder_pos_embed)
    with torch.device("meta"):
        meta = build_model("mae", "debug", img_size=IMG[2], pos_embed="learned_sincos")
    meta.to_empty(device="cpu")
    meta.init_weights()
    assert torch.equal(meta.pos_embed, a.pos_embed)


def test_resize_pos_embed_keeps_prefix_rows_and_interpolates():
    table = torch.randn(1, 1 + 4 * 6, 8)
    out = resize_pos_embed(table, (4, 6), (8, 12), num_prefix=1)
    assert out.shape == (1, 1 + 96, 8) and torch.equal(out[:, :1], table[:, :1])
    grid = table[:, 1:].reshape(1, 4, 6, 8).permute(0, 3, 1, 2)
    expect = F.interpolate(grid, size=(8, 12), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(out[:, 1:], expect.reshape(1, 96, 8))
    assert torch.equal(resize_pos_embed(table, (4, 6), (4, 6), 1), table)
    constant = torch.ones(1, 2 * 2 * 2, 3)
    torch.testing.assert_close(resize_pos_embed(constant, (2, 2, 2), (3, 4, 5)), torch.ones(1, 60, 3))
    with pytest.raises(ValueError, match="old_grid"):
        resize_pos_embed(table, (5, 5), (8, 8), num_prefix=1)


@pytest.mark.parametrize("ndim", [2, 3])
def test_load_state_dict_resizes_learned_tables_of_another_grid(ndim):
    small = build_model("mae", "debug", img_size=IMG[ndim], pos_embed="learned")
    big_size = tuple(2 * s for s in IMG[ndim])
    big = build_model("mae", "debug", img_size=big_size, pos_embed="learned")
    big.load_state_dict(small.state_dict())
    for name in ("pos_embed", "decoder_pos_embed"):
        expect = resize_pos_embed(getattr(small, name).detach(), small.grid, big.grid)
        torch.testing.assert_close(getattr(big, name).detach(), expect)
    odd = build_model("vit", "debug", img_size=(16, 32), pos_embed="learned")  # 4 x 8 grid
    state = dict(odd.state_dict(), pos_embed=torch.randn(1, 3 * 7, 64))  # 21 rows: no grid to infer
    with pytest.raises(ValueError, match="resize_pos_embed"):
        odd.load_state_dict(state)


# ---------------------------------------------------------------- optimiser and initialisation
def test_no_weight_decay_names_norms_biases_tokens_and_embeddings():
    model = build_model("mae", "debug", img_size=IMG[2], pos_embed="learned", qk_norm=True, init_values=0.1)
    params = dict(model.named_parameters())
    names = model.no_weight_decay()
    assert names <= params.keys()
    expected = {
        "cls_token",
        "mask_token",
        "pos_embed",
        "decoder_pos_embed",
        "patch_embed.proj.bias",
        "blocks.0.norm1.weight",
        "blocks.0.attn.q.bias",
        "blocks.0.attn.q_norm.weight",
        "blocks.0.ls1.gamma",
        "blocks.1.mlp.fc2.bias",
        "norm.bias",
        "decoder_blocks.0.attn.proj.bias",
        "decoder_pred.bias",
    }
    assert expected <= names
    decayed = params.keys() - names
    assert {
        "patch_embed.proj.weight",
        "blocks.0.attn.q.weight",
        "blocks.0.mlp.fc1.weight",
        "decoder_pred.weight",
    } <= decayed
    assert all(params[n].ndim >= 2 and not n.endswith("bias") for n in decayed)
    varemb = build_model("vit", "debug", img_size=IMG[2], variables=["a", "b"], use_varemb=True)
    assert {"var_embed", "var_agg.query", "patch_embed.bias", "head.bias"} <= varemb.no_weight_decay()
    assert "patch_embed.weight" not in varemb.no_weight_decay()


def test_qkv_weights_share_the_fused_xavier_bound():
    model = build_model("vit", "base", img_size=32, num_classes=10)
    bound = math.sqrt(6 / (768 + 3 * 768))  # MAE reference: xavier_uniform_ on the (3*768, 768) qkv weight
    for lin in (model.blocks[0].attn.q, model.blocks[0].attn.k, model.blocks[0].attn.v):
        w = lin.weight
        assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.01 * bound
    proj = model.blocks[0].attn.proj.weight
    assert proj.abs().max() > 1.3 * bound  # other linears keep their own (larger) bound


# ---------------------------------------------------------------- variables and patch grids
def test_diffusion_with_a_subset_of_variables_predicts_the_input_channels():
    variables = ["red", "green", "blue", "nir"]
    model = build_model("diffusion", "debug", img_size=IMG[2], variables=variables, use_varemb=True, time_steps=3)
    x, noise = torch.randn(2, 2, *IMG[2]), torch.randn(2, 2, *IMG[2])
    pred = model(x, torch.tensor([0, 2]), ["nir", "red"])
    assert pred.shape == x.shape
    (pred - noise).pow(2).mean().backward()  # the noise loss of the trainer
    full = model(torch.zeros(2, 4, *IMG[2]).index_copy(1, torch.tensor([3, 0]), x), torch.tensor([0, 2]))
    assert full.shape == (2, 4, *IMG[2])
    sample = DDPMScheduler(3).sample(lambda xt, t: model(xt, t, ["nir", "red"]), (2, 2, *IMG[2]))
    assert sample.shape == (2, 2, *IMG[2]) and sample.isfinite().all()


def test_grid_patches_of_an_indivisible_image_is_a_clear_error():
    with pytest.raises(ValueError, match=r"not divisible by patch_size=4.*e\.g\. \(16, 16\)"):
        grid_patches(torch.randn(1, 3, 18, 16), 4)


def test_sap_variable_options():
    variables = ["red", "green", "blue", "nir"]
    sap = build_model("sap", "debug", img_size=IMG[2], variables=variables, use_varemb=True).eval()
    x = torch.randn(2, 2, *IMG[2])
    out = sap(grid_patches(x, 4), variables=["nir", "red"])
    assert out.shape == (2, sap.num_classes, *IMG[2])
    assert not torch.allclose(out, sap(grid_patches(x, 4), variables=["red", "nir"]))
    single = build_model("sap", "debug", img_size=IMG[2], variables=["ct", "mri"], single_channel=True).eval()
    one = grid_patches(torch.randn(2, 1, *IMG[2]), 4)
    assert not torch.allclose(single(one, variables=["ct"]), single(one, variables=["mri"]))
    for kind in ("learned", "learned_sincos"):
        with pytest.raises(ValueError, match=f"SAP does not support pos_embed='{kind}'.*continuous positions"):
            build_model("sap", "debug", pos_embed=kind)
