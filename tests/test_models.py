"""Every family in 2D and 3D: shapes, gradients, determinism (a registry-driven matrix)."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, IMG, make_inputs, output_tensor
from ucfvit.models import SampleRNG, build_model, list_models


def expected_shape(name: str, model, batch: int) -> tuple[int, ...]:
    if name == "vit":
        return (batch, model.num_classes)
    if name == "mae":
        return (batch, model.num_patches, model.patch_size**model.ndim * 3)
    if name == "diffusion":
        return (batch, 3, *model.img_size)
    return (batch, model.num_classes, *model.img_size)  # unetr, sap: dense logits


def test_registry_lists_the_built_in_families_in_order():
    assert list_models()[:5] == ["vit", "mae", "unetr", "sap", "diffusion"]


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name", FAMILIES)
def test_forward_shape_and_finite_gradients(name, ndim):
    model = build_model(name, "debug", img_size=IMG[ndim], drop_path_rate=0.1)
    batch = 8  # drop path never drops a branch for every sample (0.1**8), which would zero its gradients
    x = torch.randn(batch, 3, *IMG[ndim])
    args, kwargs = make_inputs(model, x)
    out = model(*args, **kwargs)
    pred = output_tensor(out)
    assert pred.shape == expected_shape(name, model, batch)
    loss = model.loss(x, *out) if name == "mae" else pred.float().pow(2).mean()
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
    nonzero = sum(bool(p.grad.abs().sum() > 0) for p in model.parameters())
    assert nonzero == len(list(model.parameters())), f"{name}: some parameters got an all-zero gradient"


@pytest.mark.parametrize("name", FAMILIES)
def test_fixed_seed_gives_identical_outputs(name):
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = build_model(name, "debug", img_size=IMG[2], drop_path_rate=0.2)
        x = torch.randn(3, 3, *IMG[2])
        args, kwargs = make_inputs(model, x)
        outs.append(output_tensor(model(*args, **kwargs, rng=torch.Generator().manual_seed(7))))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_drop_path_follows_the_generator():
    model = build_model("vit", "debug", img_size=IMG[2], drop_path_rate=0.5).train()
    x = torch.randn(4, 3, *IMG[2])
    a = model(x, rng=torch.Generator().manual_seed(1))
    b = model(x, rng=torch.Generator().manual_seed(1))
    c = model(x, rng=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    model.eval()  # no drop path in eval: the generator is irrelevant
    torch.testing.assert_close(
        model(x, rng=torch.Generator().manual_seed(1)), model(x, rng=torch.Generator().manual_seed(2))
    )


def test_sample_rng_is_independent_of_batch_split():
    """Rows of a split batch get the same noise as in the whole batch (mesh independence)."""
    model = build_model("mae", "debug", img_size=IMG[2], drop_path_rate=0.3)
    x = torch.randn(6, 3, *IMG[2])
    whole_pred, whole_mask = model(x, rng=SampleRNG(seed=5, step=2, start=0, total=6))
    for start, stop in [(0, 2), (2, 6)]:
        pred, mask = model(x[start:stop], rng=SampleRNG(seed=5, step=2, start=start, total=6))
        torch.testing.assert_close(mask, whole_mask[start:stop], rtol=0, atol=0)
        torch.testing.assert_close(pred, whole_pred[start:stop], rtol=1e-5, atol=1e-6)
    other_step, _ = model(x, rng=SampleRNG(seed=5, step=3, start=0, total=6))
    assert not torch.allclose(other_step, whole_pred)


@pytest.mark.parametrize("name", FAMILIES)
def test_meta_build_then_materialise_matches_init(name):
    """Built on meta, ``to_empty`` + ``init_weights`` gives finite weights and correct buffers."""
    with torch.device("meta"):
        model = build_model(name, "debug", img_size=IMG[2])
    model.to_empty(device="cpu")
    model.init_weights()
    ref = build_model(name, "debug", img_size=IMG[2])
    for (n, b), (_, rb) in zip(model.named_buffers(), ref.named_buffers(), strict=True):
        torch.testing.assert_close(b, rb, msg=f"buffer {n} not recomputed")
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
    x = torch.randn(2, 3, *IMG[2])
    args, kwargs = make_inputs(model, x)
    assert torch.isfinite(output_tensor(model(*args, **kwargs))).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_shared_module_names(name):
    """One tensor-parallel plan works by name for every family."""
    names = {n for n, _ in build_model(name, "debug", img_size=IMG[2]).named_modules()}
    for required in [
        "patch_embed",
        "blocks.0.norm1",
        "blocks.0.attn.q",
        "blocks.0.attn.k",
        "blocks.0.attn.v",
        "blocks.0.attn.proj",
        "blocks.0.norm2",
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
        "norm",
    ]:
        assert required in names, f"{name} lacks {required}"
    if name in ("mae", "diffusion", "sap"):
        assert {"decoder_embed", "decoder_blocks.0.attn.q", "decoder_norm", "decoder_pred"} <= names


def test_no_batchnorm_anywhere():
    for name in FAMILIES:
        for ndim in (2, 3):
            model = build_model(name, "debug", img_size=IMG[ndim])
            assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
