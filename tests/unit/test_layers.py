"""Attention backends, rotary and sin-cos embeddings, patchify, variable aggregation."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from conftest import FAMILIES, IMG, make_inputs, output_tensor
from ucfvit.models import build_model, patchify, unpatchify
from ucfvit.models.embed import VariableAggregation, grid_coords, rope_angles, sincos_embed
from ucfvit.models.layers import apply_rotary, attention


def test_sdpa_and_math_backends_agree_in_fp32():
    q, k, v = (torch.randn(2, 4, 17, 16) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, "sdpa"), attention(q, k, v, "math"), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_whole_models_agree_across_sdpa_and_math(name):
    torch.manual_seed(0)
    a = build_model(name, "debug", img_size=IMG[2], attn_backend="sdpa", rope=True)
    b = build_model(name, "debug", img_size=IMG[2], attn_backend="math", rope=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, *IMG[2])
    args, _ = make_inputs(a, x)
    g = torch.Generator
    out_a = output_tensor(a(*args, rng=g().manual_seed(0)))
    out_b = output_tensor(b(*args, rng=g().manual_seed(0)))
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-5)


@pytest.mark.skipif(
    importlib.util.find_spec("xformers") is None or not torch.cuda.is_available(),
    reason="xformers has no CPU kernels: needs the xformers package and a CUDA device",
)
def test_xformers_matches_sdpa_in_bf16():
    # Flash/memory-efficient kernels have no fp32 path: compare in bf16, tolerance 2e-2 (bf16 has 8 mantissa bits).
    q, k, v = (torch.randn(2, 8, 197, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, "xformers"), attention(q, k, v, "sdpa"), rtol=0, atol=2e-2)


def test_xformers_requested_but_missing_is_a_clear_error():
    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed here")
    with pytest.raises(ValueError, match="xformers"):
        build_model("vit", "debug", attn_backend="xformers")


@pytest.mark.parametrize("ndim", [2, 3])
def test_patchify_roundtrip(ndim):
    x = torch.randn(2, 3, *IMG[ndim])
    tokens = patchify(x, 4)
    assert tokens.shape == (2, math.prod(s // 4 for s in IMG[ndim]), 4**ndim * 3)
    assert torch.equal(unpatchify(tokens, 4, IMG[ndim]), x)
    # Token 1 is the second patch along the last axis; its first value is pixel (0, .., 4) of channel 0.
    assert tokens[0, 1, 0] == x[0, 0][(0,) * (ndim - 1) + (4,)]


def test_sincos_grid_matches_the_closed_form():
    emb = sincos_embed(grid_coords((3, 5)), 8)  # 2 axes x (2 sin + 2 cos)
    row, col = 2, 4
    token = emb[row * 5 + col]
    freqs = [1.0, 1.0 / 100.0]  # 1 / 10000^(i/2)
    # MAE's layout: the column (w) coordinate fills the first half, the row (h) the second.
    expect = [math.sin(col * f) for f in freqs] + [math.cos(col * f) for f in freqs]
    expect += [math.sin(row * f) for f in freqs] + [math.cos(row * f) for f in freqs]
    torch.testing.assert_close(token, torch.tensor(expect))
    # 1D (timestep embedding) and 3D keep the coordinate order: axis 0 first.
    t = sincos_embed(torch.tensor([[3.0]]), 4)[0]
    torch.testing.assert_close(t, torch.tensor([math.sin(3.0), math.sin(0.03), math.cos(3.0), math.cos(0.03)]))
    e3 = sincos_embed(torch.tensor([[1.0, 2.0, 3.0]]), 6)[0]  # one frequency per axis
    torch.testing.assert_close(
        e3, torch.tensor([math.sin(1.0), math.cos(1.0), math.sin(2.0), math.cos(2.0), math.sin(3.0), math.cos(3.0)])
    )


def test_rotary_preserves_norms_and_relative_positions():
    coords = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [3.0, 1.0]]])
    cos, sin = rope_angles(coords, 8)
    q = torch.randn(1, 2, 3, 8)
    torch.testing.assert_close(apply_rotary(q, (cos, sin)).norm(dim=-1), q.norm(dim=-1))
    # q.k after rotation depends only on the coordinate difference.
    k = torch.randn(1, 2, 3, 8)
    shifted = rope_angles(coords + torch.tensor([5.0, -2.0]), 8)
    dot = apply_rotary(q, (cos, sin)) @ apply_rotary(k, (cos, sin)).transpose(-1, -2)
    dot_shifted = apply_rotary(q, shifted) @ apply_rotary(k, shifted).transpose(-1, -2)
    torch.testing.assert_close(dot, dot_shifted, rtol=1e-4, atol=1e-5)


def test_variable_aggregation_of_a_subset_of_variables():
    variables = ["red", "green", "blue", "nir"]
    model = build_model("vit", "debug", img_size=IMG[2], variables=variables, use_varemb=True, num_classes=5)
    assert model(torch.randn(2, 4, *IMG[2])).shape == (2, 5)
    x = torch.randn(2, 2, *IMG[2])
    out = model(x, ["nir", "red"])
    assert out.shape == (2, 5)
    assert not torch.allclose(out, model(x, ["red", "nir"])), "variable names must select the embedding"
    mae = build_model("mae", "debug", img_size=IMG[2], variables=variables, use_varemb=True)
    pred, mask = mae(x, ["nir", "red"])
    assert pred.shape == (2, mae.num_patches, 16 * 2)
    assert mae.loss(x, pred, mask).isfinite()
    unetr = build_model("unetr", "debug", img_size=IMG[2], variables=variables, use_varemb=True)
    assert unetr(x, ["green", "blue"]).shape == (2, 2, *IMG[2])


def test_aggregation_is_permutation_invariant_over_variables():
    agg = VariableAggregation(16, 4)
    agg.reset_parameters()
    tokens = torch.randn(2, 3, 5, 16)
    torch.testing.assert_close(agg(tokens), agg(tokens[:, [2, 0, 1]]), rtol=1e-5, atol=1e-6)


def test_single_channel_mode_uses_the_variable_embedding():
    model = build_model("mae", "debug", img_size=IMG[2], variables=["ct", "mri"], single_channel=True)
    x = torch.randn(2, 1, *IMG[2])
    gen = torch.Generator
    a, _ = model(x, ["ct"], rng=gen().manual_seed(0))
    b, _ = model(x, ["mri"], rng=gen().manual_seed(0))
    assert a.shape == (2, model.num_patches, 16) and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="1 channel"):
        model(torch.randn(2, 2, *IMG[2]), ["ct", "mri"])
