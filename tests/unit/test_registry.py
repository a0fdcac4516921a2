"""The model registry (ucfvit.models.registry): the built-in families in order, presets that reproduce
their papers' parameter counts, and bad arguments of build_model as clear ValueErrors."""

from __future__ import annotations

import pytest
import torch

from conftest import IMG
from ucfvit.models import build_model, list_models


def test_registry_lists_the_built_in_families_in_order():
    assert list_models()[:5] == ["vit", "mae", "unetr", "sap", "diffusion"]


# Paper figures in millions (ImageNet-1k head, 224 px): DeiT-Ti/S, ViT-B/16, L/16, H/14, ViT-g/14.
PAPER_PARAMS_M = {"tiny": 5.7, "small": 22.0, "base": 86.0, "large": 307.0, "huge": 632.0, "giant": 1011.0}


@pytest.mark.parametrize("size", list(PAPER_PARAMS_M))
def test_preset_parameter_counts_match_papers(size):
    with torch.device("meta"):
        model = build_model("vit", size, img_size=224, num_classes=1000)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - PAPER_PARAMS_M[size]) / PAPER_PARAMS_M[size] < 0.01, f"{size}: {count:.2f}M"


def test_mae_base_matches_the_reference_model_size():
    with torch.device("meta"):
        model = build_model("mae", "base", img_size=224)
    # facebookresearch/mae mae_vit_base_patch16 has 111.9M, of which 0.25M are its frozen sin-cos
    # position tables (parameters there, buffers here), and 0.013M its key biases (which softmax
    # cancels; ucfvit has none): 111.64M.
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 111.64) < 0.02


def test_debug_head_counts_divide_small_meshes():
    model = build_model("mae", "debug")
    for heads in (model.num_heads, model.decoder_num_heads):
        assert all(heads % tp == 0 for tp in (2, 4, 8))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="vit", img_size=(30, 32)), "img_size.*divisible by patch_size"),
        (dict(name="vit", embed_dim=60, num_heads=8), "embed_dim=60.*num_heads=8"),
        (dict(name="mae", decoder_embed_dim=30, decoder_num_heads=8), "decoder_embed_dim=30"),
        (dict(name="mae", mask_ratio=1.0), r"mask_ratio=1.0.*\[0, 1\)"),
        (dict(name="mae", mask_ratio=-0.1), "mask_ratio"),
        (dict(name="resnet"), "model='resnet'.*vit"),
        (dict(name="vit", size="colossal"), "size='colossal'.*debug"),
        (dict(name="vit", pos_embed="fourier"), "pos_embed='fourier'.*sincos"),
        (dict(name="vit", attn_backend="flash3"), "attn_backend='flash3'.*sdpa"),
        (dict(name="vit", decoder_depth=2), r"vit does not take \['decoder_depth'\]"),
        (dict(name="unetr", patch_size=6, img_size=(24, 24)), "patch_size=6.*power of two"),
        (dict(name="vit", img_size=(8, 8, 8, 8)), "2 .*or 3"),
    ],
)
def test_bad_arguments_raise_value_errors(kwargs, match):
    kwargs = dict(kwargs)
    name, size = kwargs.pop("name"), kwargs.pop("size", "debug")
    with pytest.raises(ValueError, match=match):
        build_model(name, size, **kwargs)


def test_unknown_variable_names_are_rejected_with_the_allowed_list():
    model = build_model("vit", "debug", img_size=IMG[2], variables=["red", "green", "blue"], use_varemb=True)
    with pytest.raises(ValueError, match=r"\['nir'\] are unknown; allowed values: \['red', 'green', 'blue'\]"):
        model(torch.randn(1, 2, *IMG[2]), ["red", "nir"])


def test_wrong_image_size_is_rejected():
    model = build_model("vit", "debug", img_size=IMG[2])
    with pytest.raises(ValueError, match="img_size"):
        model(torch.randn(1, 3, 20, 16))
