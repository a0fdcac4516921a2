"""Adaptive patching (ucfvit.models.patch_sequence) in every family: PatchSequence input, pad masks,
positions, painting, variable embeddings. Training on meshes against one process:
tests/distributed/test_parallel_parity.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adaptive_inputs import quadtree, region_tokens, regions
from conftest import FAMILIES
from ucfvit.models import PatchSequence, SampleRNG, build_model, get_family, grid_patches, pad_sequence
from ucfvit.models.layers import attention
from ucfvit.models.patch_sequence import paint, region_owner
from ucfvit.train.throughput import train_flops_per_sample

ADAPTIVE = {"adaptive_patching": True, "fixed_length": 16}
CLASSES = {"vit": 3, "unetr": 3, "sap": 3}


def build(family: str, **kwargs):
    torch.manual_seed(0)
    kwargs = {"img_size": (16, 16), **ADAPTIVE, **kwargs}
    if family in CLASSES:
        kwargs.setdefault("num_classes", CLASSES[family])
    return build_model(family, "debug", **kwargs)


def short_sequence(batch: int = 2) -> PatchSequence:
    """Unpadded 2D sequences of 13 tokens: one 8x8 region (in corner i of sample i) + 12 4x4 ones."""
    x = torch.randn(batch, 3, 16, 16)
    rows = [region_tokens(x[i], regions((16, 16), 4, i), 4) for i in range(batch)]
    return PatchSequence(*[torch.stack([r[j] for r in rows]) for j in range(3)])


def interleave_pads(seq: PatchSequence, length: int, at_end: bool = False) -> PatchSequence:
    """``seq`` padded to ``length`` with finite garbage pad tokens, placed among the real tokens
    (whose order is kept) unless ``at_end``."""
    b, n = seq.sizes.shape
    padded = pad_sequence(seq, length)
    patches = padded.patches.clone()
    patches[:, n:] = torch.randn(b, length - n, *patches.shape[2:], generator=torch.Generator().manual_seed(5)) * 3
    sizes = padded.sizes.clone()
    sizes[:, n:] = 8
    padded = padded._replace(patches=patches, sizes=sizes)
    if at_end:
        return padded
    real, pads = list(range(n)), list(range(n, length))
    order = []
    while real or pads:  # one pad after every few real tokens
        order += real[:4] + pads[:1]
        real, pads = real[4:], pads[1:]
    return PatchSequence(*[t[:, order] for t in padded])


class PrefixRNG(SampleRNG):
    """Noise of token j independent of the sequence length (columns of one fixed table), so MAE
    draws the same mask for a sequence and for the same sequence with pads appended."""

    def __init__(self):
        super().__init__(0, 0, 0, 1)

    def rand(self, shape, device):
        table = torch.rand((shape[0], 64, *shape[2:]), generator=torch.Generator().manual_seed(11))
        return table[:, : shape[1]].to(device)


# ---------------------------------------------------------------- the input type
def test_grid_patches_is_a_patch_sequence_without_padding():
    x = torch.randn(2, 3, 16, 16)
    seq = grid_patches(x, 4)
    assert isinstance(seq, PatchSequence) and seq.valid is None
    patches, coords, sizes, _ = seq
    assert patches.shape == (2, 16, 3, 4, 4) and coords.shape == (2, 16, 2) and (sizes == 4).all()
    torch.testing.assert_close(patches[:, 5], x[:, :, 4:8, 4:8])


def test_quadtree_inputs_mix_region_sizes_and_pads():
    d = quadtree(torch.randn(4, 3, 16, 16), 4)
    assert d["valid"].sum(1).tolist() == [16, 13, 13, 13]
    assert sorted(d["sizes"][1][d["valid"][1]].unique().tolist()) == [4, 8]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_takes_a_patch_sequence_through_its_spec(family):
    model = build(family)
    spec = get_family(family)
    batch = {"image": torch.randn(2, 3, 16, 16), "label": torch.tensor([0, 2]), "seg": torch.randint(0, 3, (2, 16, 16))}
    batch.update(quadtree(batch["image"], 4))
    args = spec.inputs(model, batch)
    assert isinstance(args[0], PatchSequence)
    out = model(*args)
    assert torch.isfinite(out[0] if isinstance(out, tuple) else out).all()
    loss = spec.loss(model, batch, torch.Generator().manual_seed(0), spec.build_extra(model))
    loss.backward()
    assert torch.isfinite(loss)
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"{family}: no gradient for {no_grad}"
    assert model.num_patches == 16  # FLOP and token counts use fixed_length


def test_flops_count_fixed_length_tokens():
    small, large = build("vit", fixed_length=16), build("vit", fixed_length=64)
    assert train_flops_per_sample(large) > 3 * train_flops_per_sample(small)


# ---------------------------------------------------------------- pad mask == shorter sequence
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_attention_with_a_pad_mask_equals_attention_on_the_valid_keys(backend):
    q, k, v = (torch.randn(2, 4, 7, 8) for _ in range(3))
    valid = torch.tensor([[1, 1, 0, 1, 0, 1, 1], [0, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    out = attention(q, k, v, backend, valid)
    for i in range(2):
        ref = attention(q[i : i + 1], k[i : i + 1, :, valid[i]], v[i : i + 1, :, valid[i]], backend)
        torch.testing.assert_close(out[i : i + 1], ref, rtol=1e-5, atol=1e-6)


def test_xformers_gets_the_pad_mask_as_an_additive_bias(monkeypatch):
    """xformers is CUDA-only: a stand-in with its documented API (inputs (B, N, heads, hd),
    ``attn_bias`` (B, heads, N, M)) checks that the mask arrives as a -inf bias in that layout."""
    import sys
    import types

    def memory_efficient_attention(q, k, v, attn_bias=None):
        scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / q.shape[-1] ** 0.5
        if attn_bias is not None:
            assert attn_bias.shape == scores.shape and attn_bias.stride(-2) % 8 == 0
            scores = scores + attn_bias
        return torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1), v)

    ops = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setitem(sys.modules, "xformers", types.SimpleNamespace(ops=ops))
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    q, k, v = (torch.randn(2, 4, 7, 8) for _ in range(3))
    valid = torch.tensor([[1, 1, 0, 1, 0, 1, 1], [0, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    torch.testing.assert_close(attention(q, k, v, "xformers", valid), attention(q, k, v, "sdpa", valid))
    torch.testing.assert_close(attention(q, k, v, "xformers"), attention(q, k, v, "sdpa"))


def _pair(family: str, backend: str, **kwargs):
    padded = build(family, fixed_length=16, attn_backend=backend, **kwargs).eval()
    short = build(family, fixed_length=13, attn_backend=backend, **kwargs).eval()
    short.load_state_dict(padded.state_dict())
    return padded, short


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize(
    "family, kwargs",
    [
        ("vit", {}),
        ("vit", {"class_token": False}),
        ("vit", {"use_adaptive_pos_emb": True, "rope": True}),
        ("unetr", {}),
        ("unetr", {"linear_decoder": True}),
        ("sap", {}),
        ("sap", {"use_adaptive_pos_emb": True}),
    ],
)
def test_pad_mask_gives_the_result_of_the_unpadded_sequence(family, kwargs, backend):
    padded_model, short_model = _pair(family, backend, **kwargs)
    seq = short_sequence()
    with torch.no_grad():
        ref = short_model(seq)
        out = padded_model(interleave_pads(seq, 16))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("kwargs", [{}, {"norm_pix_loss": True, "class_token": True}, {"linear_decoder": True}])
def test_mae_pad_tokens_are_never_kept_nor_scored(kwargs, backend):
    padded_model, short_model = _pair("mae", backend, **kwargs)
    seq = short_sequence()
    padded = interleave_pads(seq, 16, at_end=True)
    with torch.no_grad():
        pred_s, mask_s = short_model(seq, rng=PrefixRNG())
        pred_p, mask_p = padded_model(padded, rng=PrefixRNG())
        loss_s, loss_p = short_model.loss(seq, pred_s, mask_s), padded_model.loss(padded, pred_p, mask_p)
    assert (mask_p[:, 13:] == 0).all() and torch.equal(mask_p[:, :13], mask_s)
    assert (mask_s.sum(1) == 13 - int(13 * 0.25)).all()
    torch.testing.assert_close(pred_p[:, :13], pred_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_p, loss_s, rtol=1e-5, atol=1e-6)


def test_mae_keeps_a_share_of_each_samples_valid_patches():
    model = build("mae", mask_ratio=0.5)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args, kw: seen.append(kw["valid"]), with_kwargs=True)
    d = quadtree(torch.randn(4, 3, 16, 16), 4)
    seq = PatchSequence(d["patches"], d["coords"], d["sizes"], d["valid"])
    _, mask = model(seq)
    # class token + int(V * 0.5) of V = 16, 13 valid patches, in 1 + 8 slots
    assert seen[0].shape == (4, 9) and seen[0].sum(1).tolist() == [9, 7, 7, 7]
    assert mask.sum(1).tolist() == [8, 7, 7, 7] and (mask[~d["valid"]] == 0).all()


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_diffusion_pad_mask_gives_the_noise_of_the_unpadded_sequence(backend):
    padded_model, short_model = _pair("diffusion", backend)
    seq, t = short_sequence(), torch.tensor([3, 500])
    padded = interleave_pads(seq, 16)
    with torch.no_grad():
        ref, out = short_model(seq, t), padded_model(padded, t)
    assert out.shape == padded.patches.shape
    torch.testing.assert_close(out[padded.valid].view_as(ref), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- clear errors
@pytest.mark.parametrize("family", FAMILIES)
def test_wrong_kind_of_input_is_a_clear_error(family):
    x = torch.randn(2, 3, 16, 16)
    t = (torch.tensor([1, 2]),) if family == "diffusion" else ()
    model = build(family)
    with pytest.raises(TypeError, match="adaptive_patching=True and takes a PatchSequence"):
        model(x, *t)
    seq = grid_patches(x, 4)
    with pytest.raises(ValueError, match="fixed_length=16"):
        model(seq._replace(patches=seq.patches[:, :12], coords=seq.coords[:, :12], sizes=seq.sizes[:, :12]), *t)
    resized = F.interpolate(seq.patches.flatten(0, 1), size=(8, 8)).view(2, 16, 3, 8, 8)
    with pytest.raises(ValueError, match="must be resized to patch_size=4"):
        model(seq._replace(patches=resized), *t)
    if family == "sap":
        return  # SAP is adaptive by construction
    torch.manual_seed(0)
    plain = build_model(family, "debug", img_size=(16, 16), **({"num_classes": 3} if family in CLASSES else {}))
    with pytest.raises(TypeError, match="adaptive_patching=False and takes images"):
        plain(seq, *t)


def test_constructor_errors_name_the_option():
    with pytest.raises(ValueError, match="use_adaptive_pos_emb=True"):
        build("mae", pos_embed="learned")
    with pytest.raises(ValueError, match="needs adaptive_patching=True"):
        build_model("vit", "debug", img_size=16, fixed_length=16)
    with pytest.raises(ValueError, match="needs adaptive_patching=True"):
        build_model("mae", "debug", img_size=16, use_adaptive_pos_emb=True)
    assert build("vit").pos_embed_kind == "sincos"  # ViT's learned-table default does not apply


def test_unetr_painting_checks_alignment_and_tiling():
    model = build("unetr")
    seq = grid_patches(torch.randn(1, 3, 16, 16), 4)
    shifted = seq.coords.clone()
    shifted[0, 3] += 2
    with pytest.raises(ValueError, match="multiples of patch_size=4"):
        model(seq._replace(coords=shifted))
    overlap = seq.sizes.clone()
    overlap[0, 0] = 8  # covers cells of tokens 1, 4, 5 too
    with pytest.raises(ValueError, match="tile the image"):
        model(seq._replace(sizes=overlap))
    hole = seq._replace(valid=torch.arange(16).view(1, 16) != 6)
    with pytest.raises(ValueError, match="by no region"):
        model(hole)


def test_paint_copies_each_token_over_its_region():
    corners, sides = zip(*regions((16, 16), 4, 3), strict=True)  # big region in the bottom-right quadrant
    seq = PatchSequence(torch.zeros(1, 13, 3, 4, 4), torch.tensor([corners]), torch.tensor([sides]))
    tokens = torch.arange(13, dtype=torch.float32).view(1, 13, 1)
    grid = paint(tokens, region_owner(seq, (16, 16), 4), (4, 4))[0, 0]
    assert (grid[2:, 2:] == 0).all()
    for i, (r, c) in enumerate(corners[1:], start=1):
        assert grid[r // 4, c // 4] == i


# ---------------------------------------------------------------- learned adaptive positions
@pytest.mark.parametrize("family", ["sap", "mae", "vit"])
def test_adaptive_pos_emb_changes_the_output_and_trains(family):
    seq = short_sequence()
    fixed = build(family, fixed_length=13).eval()
    learned = build(family, fixed_length=13, use_adaptive_pos_emb=True).eval()
    missing = learned.load_state_dict(fixed.state_dict(), strict=False).missing_keys
    assert missing and all("pos_embed_adaptive" in k for k in missing)

    def gen():
        return torch.Generator().manual_seed(0)

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    with torch.no_grad():
        assert not torch.allclose(first(learned(seq, rng=gen())), first(fixed(seq, rng=gen())), atol=1e-4)
    learned.train()
    opt = torch.optim.AdamW(learned.parameters(), lr=1e-3)
    target = torch.randn_like(first(learned(seq, rng=gen())))
    losses = []
    for _ in range(5):
        loss = (first(learned(seq, rng=gen())) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert learned.pos_embed_adaptive.proj.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------- variable embeddings


@pytest.mark.parametrize("family", ["mae", "diffusion"])
def test_adaptive_variable_embedding_predicts_the_input_channels(family):
    """With use_varemb the decoder predicts every declared variable; a sequence of a subset of them
    gets its own channels back, as images do."""
    model = build_model(
        family, "debug", img_size=16, adaptive_patching=True, use_varemb=True, variables=["a", "b", "c", "d"]
    )
    seq = grid_patches(torch.randn(2, 2, 16, 16), 4)
    args = (seq, torch.tensor([3, 9])) if family == "diffusion" else (seq,)
    out = model(*args, variables=["d", "b"], rng=torch.Generator().manual_seed(0))
    pred = out[0] if family == "mae" else out
    expected = (2, 16, 4 * 4 * 2) if family == "mae" else tuple(seq.patches.shape)
    assert tuple(pred.shape) == expected
