"""Weights in and out (ucfvit.interop): timm ViTs, MAE reference and UCF-VIT checkpoints against reference
forwards written from their definitions (tests/reference_models.py), and files read without
unpickling code."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from reference_models import (
    block_shapes,
    mae_reference_forward,
    mae_reference_patchify,
    mae_reference_state,
    random_state,
    split_tensor_parallel,
    timm_vit_forward,
    ucf_vit_forward,
    ucf_vit_state,
)
from ucfvit.interop import (
    ENCODER_PREFIXES,
    WeightsError,
    check_weights,
    encoder_only,
    from_mae_reference,
    from_timm,
    from_ucf_vit,
    load_pretrained,
    read_pretrained,
    read_weights,
    to_mae_reference,
    to_timm,
    to_ucfvit_names,
)
from ucfvit.models import build_model, grid_patches


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Biases and norms away from their zero/one init, so every tensor matters; eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


# ---------------------------------------------------------------- timm
@pytest.mark.parametrize("qk_norm_and_ls", [False, True])
def test_timm_avg_pool_vit_converts_to_equal_logits(qk_norm_and_ls):
    d, depth, heads, patch, grid, classes = 64, 2, 4, 4, 4, 7
    shapes = {"patch_embed.proj.weight": (d, 3, patch, patch), "patch_embed.proj.bias": (d,), "cls_token": (1, 1, d)}
    shapes |= {"pos_embed": (1, 1 + grid * grid, d), "fc_norm.weight": (d,), "fc_norm.bias": (d,)}
    shapes |= {"head.weight": (classes, d), "head.bias": (classes,)}
    for i in range(depth):
        shapes |= block_shapes(f"blocks.{i}", d, qk_norm_and_ls, heads)
    state = random_state(shapes, torch.Generator().manual_seed(0))
    if qk_norm_and_ls:
        for i in range(depth):  # a key bias would pass through k_norm: timm qk_norm models have none here
            state[f"blocks.{i}.attn.qkv.bias"][d : 2 * d] = 0
    x = torch.randn(2, 3, patch * grid, patch * grid, generator=torch.Generator().manual_seed(1))
    expect = timm_vit_forward(state, x, depth, heads, patch)

    model = build_model(
        "vit",
        "debug",
        img_size=patch * grid,
        patch_size=patch,
        embed_dim=d,
        depth=depth,
        num_heads=heads,
        num_classes=classes,
        global_pool="avg",
        class_token=True,
        pos_embed="learned",
        qk_norm=qk_norm_and_ls,
        init_values=0.1 if qk_norm_and_ls else None,
    ).eval()
    model.load_state_dict(from_timm(state))
    torch.testing.assert_close(model(x), expect, rtol=0, atol=1e-5)
    if qk_norm_and_ls:
        state["blocks.0.attn.qkv.bias"][d] = 1.0
        with pytest.raises(WeightsError, match="key bias"):
            from_timm(state)


@pytest.mark.parametrize("pos_embed, qk_norm_and_ls", [("learned", True), ("sincos", False)])
def test_vit_exports_to_a_timm_state_dict_with_equal_logits_and_back(pos_embed, qk_norm_and_ls):
    d, depth, heads, patch, grid = 32, 2, 4, 4, 4
    kwargs = dict(
        img_size=patch * grid,
        patch_size=patch,
        embed_dim=d,
        depth=depth,
        num_heads=heads,
        num_classes=5,
        global_pool="avg",
        class_token=True,
        pos_embed=pos_embed,
        qk_norm=qk_norm_and_ls,
        init_values=0.1 if qk_norm_and_ls else None,
    )
    model = perturbed(build_model("vit", "debug", **kwargs))
    x = torch.randn(2, 3, patch * grid, patch * grid)
    state = to_timm(model)
    assert "blocks.0.attn.qkv.weight" in state and state["pos_embed"].shape == (1, 1 + grid * grid, d)
    torch.testing.assert_close(timm_vit_forward(state, x, depth, heads, patch), model(x), rtol=0, atol=1e-5)
    back = build_model("vit", "debug", **{**kwargs, "pos_embed": "learned"}).eval()
    back.load_state_dict(from_timm(state))
    torch.testing.assert_close(back(x), model(x), rtol=0, atol=1e-5)
    for bad in (dict(rope=True, pos_embed="none"), dict(use_varemb=True, variables=["a", "b", "c"])):
        with pytest.raises(WeightsError, match="timm's VisionTransformer has no equivalent"):
            to_timm(build_model("vit", "debug", img_size=16, **bad))


# ---------------------------------------------------------------- MAE reference
MAE_SIZES = dict(d=32, depth=2, dd=16, ddepth=2, patch=4, grid=4)
HEADS, DHEADS, RATIO = 4, 2, 0.75


def mae_kwargs(**extra) -> dict:
    s = MAE_SIZES
    return dict(
        img_size=s["patch"] * s["grid"],
        patch_size=s["patch"],
        embed_dim=s["d"],
        depth=s["depth"],
        num_heads=HEADS,
        decoder_embed_dim=s["dd"],
        decoder_depth=s["ddepth"],
        decoder_num_heads=DHEADS,
        mask_ratio=RATIO,
        **extra,
    )


@pytest.fixture(scope="module")
def mae_checkpoint(tmp_path_factory):
    """A reference-format training checkpoint on disk ({'model', 'optimizer', 'epoch', 'args'}), and an image batch."""
    state = mae_reference_state(torch.Generator().manual_seed(0), **MAE_SIZES)
    path = tmp_path_factory.mktemp("mae") / "checkpoint-399.pth"
    args = argparse.Namespace(model="mae_vit_tiny", mask_ratio=RATIO, input_size=16, lr=1.5e-4)
    torch.save({"model": state, "optimizer": {"state": {}}, "epoch": 399, "args": args}, path)
    side = MAE_SIZES["patch"] * MAE_SIZES["grid"]
    return path, state, torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def double(state: dict) -> dict:
    """Float64 copies: the MAE comparisons run in float64, where a correct conversion agrees to ~1e-12."""
    return {k: v.double() for k, v in state.items()}


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_mae_reference_checkpoint_gives_equal_reconstructions_and_encoder_outputs(mae_checkpoint, pos_embed):
    path, state, x = mae_checkpoint
    model = build_model("mae", "debug", **mae_kwargs(pos_embed=pos_embed)).double().eval()
    checkpoint = read_weights(path)
    if pos_embed == "learned":  # a trained table: its class row (folded into cls_token) is not zero
        trained = state["pos_embed"] + 0.1 * torch.randn(state["pos_embed"].shape, generator=torch.Generator())
        state = checkpoint["model"] = double(dict(state, pos_embed=trained))  # folded in float64: exact
    model.load_state_dict(from_mae_reference(checkpoint, pos_embed=pos_embed))  # strict: every key matches
    noise = torch.rand(2, MAE_SIZES["grid"] ** 2, generator=torch.Generator().manual_seed(7))
    state = double(state)
    _, expect, expect_mask = mae_reference_forward(
        state, x, noise, heads=HEADS, dheads=DHEADS, patch=4, mask_ratio=RATIO
    )
    pred, mask = model(x, rng=torch.Generator().manual_seed(7))  # the same noise: torch.rand from that seed
    assert torch.equal(mask, expect_mask)
    torch.testing.assert_close(pred, expect, rtol=0, atol=1e-10)
    assert torch.equal(model.patchify(x), mae_reference_patchify(x, 4))  # so the loss targets agree too
    unmasked = torch.arange(16.0).expand(2, -1)  # sorted noise: every patch kept, in order
    latent, _, _ = mae_reference_forward(state, x, unmasked, heads=HEADS, dheads=DHEADS, patch=4, mask_ratio=0.0)
    torch.testing.assert_close(model.forward_features(x), latent, rtol=0, atol=1e-10)


def test_mae_encoder_initialises_vit_unetr_and_sap_with_equal_encoder_outputs(mae_checkpoint):
    path, state, x = mae_checkpoint
    converted = from_mae_reference(read_weights(path))
    state = double(state)
    latent, _, _ = mae_reference_forward(
        state, x, torch.arange(16.0).expand(2, -1), heads=HEADS, dheads=DHEADS, patch=4, mask_ratio=0.0
    )
    assert set(encoder_only(converted)) == {k for k in converted if not k.startswith(("decoder", "mask_token"))}
    kwargs = {k: v for k, v in mae_kwargs().items() if not k.startswith(("decoder", "mask"))}
    for family in ("vit", "unetr"):
        model = build_model(family, "debug", **kwargs, class_token=True, pos_embed="sincos").double().eval()
        report = load_pretrained(model, converted, ENCODER_PREFIXES)
        assert set(report.loaded) == set(encoder_only(converted))
        assert set(report.skipped) == set(converted) - set(encoder_only(converted))  # the decoder
        assert report.fresh and not any(k.startswith(ENCODER_PREFIXES) for k in report.fresh)  # head / conv decoder
        torch.testing.assert_close(model.forward_features(x), latent, rtol=0, atol=1e-10)
    # SAP embeds resized patches with a linear map: the conv kernel flattened is that map.
    sap = build_model("sap", "debug", **kwargs, class_token=True).double().eval()
    report = load_pretrained(sap, converted, ENCODER_PREFIXES)
    assert "patch_embed.proj.weight" in report.loaded and "cls_token" in report.loaded
    assert sap.patch_embed.proj.weight.shape == (32, 48)
    patches = grid_patches(x, 4).patches  # (B, N, C, p, p), row-major like the conv
    expect = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=4)
    torch.testing.assert_close(sap.patch_embed(patches), expect.flatten(2).transpose(1, 2), rtol=0, atol=1e-12)
    wide = build_model("vit", "debug", **{**kwargs, "embed_dim": 64}, class_token=True)  # learned table
    report = load_pretrained(wide, from_mae_reference(read_weights(path), pos_embed="learned"))
    assert report.skipped["blocks.0.mlp.fc1.weight"] == "shape (128, 32) does not fit the model's (256, 64)"
    assert report.skipped["pos_embed"] == "shape (1, 16, 32) does not fit the model's (1, 16, 64)"
    assert {"blocks.0.mlp.fc1.weight", "pos_embed"} <= set(report.fresh) and "skipped" in report.summary()


def test_a_learned_table_of_another_grid_is_resized_on_load(mae_checkpoint):
    path, state, _ = mae_checkpoint
    converted = from_mae_reference(read_weights(path), pos_embed="learned")  # a 4 x 4 grid
    kwargs = {k: v for k, v in mae_kwargs().items() if not k.startswith(("decoder", "mask"))}
    big = build_model("vit", "debug", **{**kwargs, "img_size": 24}, class_token=True, pos_embed="learned")
    report = load_pretrained(big, converted, ENCODER_PREFIXES)
    assert "pos_embed" in report.loaded and big.pos_embed.shape == (1, 36, 32)
    grid = converted["pos_embed"].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expect = F.interpolate(grid, size=(6, 6), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(big.pos_embed.detach(), expect)


def test_mae_exports_to_the_reference_format_and_back():
    model = perturbed(build_model("mae", "debug", **mae_kwargs()).double())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    checkpoint = to_mae_reference(model)
    state = checkpoint["model"]
    assert state["pos_embed"].shape == (1, 17, 32) and "blocks.0.attn.qkv.weight" in state
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(3))
    _, expect, _ = mae_reference_forward(state, x, noise, heads=HEADS, dheads=DHEADS, patch=4, mask_ratio=RATIO)
    torch.testing.assert_close(model(x, rng=torch.Generator().manual_seed(3))[0], expect, rtol=0, atol=1e-10)
    back = build_model("mae", "debug", **mae_kwargs()).double()
    back.load_state_dict(from_mae_reference(checkpoint))
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values(), strict=True))
    for bad, what in ((dict(linear_decoder=True), "linear_decoder"), (dict(qk_norm=True), "qk_norm")):
        with pytest.raises(WeightsError, match=f"MAE reference has no equivalent.*{what}"):
            to_mae_reference(build_model("mae", "debug", **mae_kwargs(**bad)))


def test_mae_reference_tables_that_ucfvit_cannot_express_are_named(mae_checkpoint):
    _, state, _ = mae_checkpoint
    trained = dict(state, pos_embed=state["pos_embed"] + 0.01)
    with pytest.raises(WeightsError, match="pos_embed is not the fixed sin-cos table.*pos_embed='learned'"):
        from_mae_reference({"model": trained})
    assert from_mae_reference({"model": trained}, pos_embed="learned")["pos_embed"].shape == (1, 16, 32)
    shifted = dict(state, decoder_pos_embed=state["decoder_pos_embed"] + 0.01)
    with pytest.raises(WeightsError, match="decoder_pos_embed has a non-zero class-token row"):
        from_mae_reference({"model": shifted}, pos_embed="learned")
    with pytest.raises(WeightsError, match="not an MAE reference checkpoint.*found keys state_dict"):
        from_mae_reference({"state_dict": {}})


# ---------------------------------------------------------------- files
class _Payload:
    """Pickles to a call of os.system: what a malicious checkpoint carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_file_with_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(2)}, "extra": _Payload(marker)}, path)
    with pytest.raises(WeightsError, match=r"evil\.pth: refused: the file holds a Python object \(\w+\.system\)"):
        read_weights(path)
    assert not marker.exists()


def test_weights_files_round_trip_and_bad_files_are_named(tmp_path):
    state = perturbed(build_model("vit", "debug", img_size=16)).state_dict()
    save_file(state, tmp_path / "model.safetensors")
    torch.save(state, tmp_path / "model.pth")
    for name in ("model.safetensors", "model.pth"):
        back = read_weights(tmp_path / name)
        assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    (tmp_path / "cut.pth").write_bytes((tmp_path / "model.pth").read_bytes()[:1000])
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes()[:1000])
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    for name, match in (
        ("cut.pth", "cut.pth: not a readable torch.save file"),
        ("cut.safetensors", "cut.safetensors: not a readable safetensors file"),
        ("list.pt", "list.pt: holds a list, expected a dict"),
        ("missing.pth", "missing.pth: no such weights file"),
    ):
        with pytest.raises(WeightsError, match=match):
            read_weights(tmp_path / name)


def test_weights_stored_as_integers_or_holding_nan_are_refused_naming_the_tensor(tmp_path):
    model = build_model("vit", "debug", img_size=16)
    state = model.state_dict()
    check_weights(model, state, "w.pth")
    with pytest.raises(WeightsError, match=r"w\.pth: tensor norm\.weight is stored as torch\.int64, but the model"):
        check_weights(model, {**state, "norm.weight": state["norm.weight"].long()}, "w.pth")
    bad = state["blocks.0.attn.q.weight"].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(WeightsError, match=r"w\.pth: tensor blocks\.0\.attn\.q\.weight holds 1 non-finite value"):
        check_weights(model, {**state, "blocks.0.attn.q.weight": bad}, "w.pth")
    check_weights(model, {"not.in.the.model": torch.tensor([float("nan")])}, "w.pth")  # not loaded: not judged


def test_init_from_refuses_nan_weights_naming_the_file_and_tensor(tmp_path):
    from ucfvit.train.config import ConfigError, InitConfig
    from ucfvit.train.init_from import prepare_pretrained

    model = build_model("vit", "debug", img_size=16)
    state = model.state_dict()
    state["head.weight"] = torch.full_like(state["head.weight"], float("inf"))
    torch.save(state, tmp_path / "diverged.pth")
    with pytest.raises(
        ConfigError, match=r"--init\.from: ucfvit state dict .*diverged\.pth: tensor head\.weight holds"
    ):
        prepare_pretrained(InitConfig(from_=str(tmp_path / "diverged.pth")), model)


# ---------------------------------------------------------------- UCF-VIT
UCF = dict(d=32, depth=2, patch=4, grid=4, classes=5)


def ucf_vit_model(variables: int = 0) -> torch.nn.Module:
    names = dict(use_varemb=True, variables=[f"v{i}" for i in range(variables)]) if variables else {}
    return (
        build_model(
            "vit",
            "debug",
            img_size=16,
            patch_size=4,
            embed_dim=32,
            depth=2,
            num_heads=4,
            num_classes=5,
            class_token=True,
            pos_embed="learned",
            global_pool="token",
            fc_norm=False,
            **names,
        )
        .double()
        .eval()
    )


def ucf_checkpoint(state: dict) -> dict:
    """What UCF-VIT's torch.save writes around the model state."""
    optimizer, scheduler = {"state": {}, "param_groups": []}, {"last_epoch": 3, "base_lrs": [1e-3]}
    return {
        "epoch": 3,
        "model_state_dict": state,
        "optimizer_state_dict": optimizer,
        "scheduler_state_dict": scheduler,
        "loss_list": [torch.tensor(0.5)],
    }


@pytest.mark.parametrize("variables", [0, 2])
def test_ucf_vit_checkpoints_give_equal_logits(variables, tmp_path):
    state = double(ucf_vit_state(torch.Generator().manual_seed(0), **UCF, variables=variables))
    x = torch.randn(2, variables or 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expect = ucf_vit_forward(state, x, heads=4, patch=4)
    model = ucf_vit_model(variables)
    model.load_state_dict(from_ucf_vit(ucf_checkpoint(state)))  # strict
    torch.testing.assert_close(model(x), expect, rtol=0, atol=1e-10)

    # fsdp mode with tensor parallelism: one file per tp rank, merged back exactly
    plain = {k.removeprefix("module."): v for k, v in state.items()}
    for r, part in enumerate(split_tensor_parallel(plain, 2)):
        torch.save(ucf_checkpoint(part), tmp_path / f"run_even_rank_{r}.ckpt")
    merged, what = read_pretrained(tmp_path / "run_even_rank_0.ckpt")
    assert what == "UCF-VIT checkpoint (2 tensor-parallel rank files)"
    single = from_ucf_vit(ucf_checkpoint(state))
    assert merged.keys() == single.keys() and all(torch.equal(merged[k], single[k]) for k in single)


def test_ucf_vit_mae_loads_and_adaptive_embeddings_are_refused():
    d, dd, n = 32, 16, 16
    shapes = {"pos_embed": (1, n, d), "patch_embed.proj.weight": (d, 3, 4, 4), "patch_embed.proj.bias": (d,)}
    shapes |= {"norm.weight": (d,), "norm.bias": (d,), "mask_token": (1, 1, dd), "decoder_pos_embed": (1, n, dd)}
    shapes |= {"decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,), "decoder_norm.weight": (dd,)}
    shapes |= {"decoder_norm.bias": (dd,), "decoder_pred.weight": (48, dd), "decoder_pred.bias": (48,)}
    for i in range(2):
        shapes |= block_shapes(f"blocks.{i}", d) | block_shapes(f"decoder_blocks.{i}", dd)
    state = random_state(shapes, torch.Generator().manual_seed(0))
    state["token_embeds.proj.weight"] = state["patch_embed.proj.weight"]
    model = build_model("mae", "debug", **mae_kwargs(class_token=False, pos_embed="learned"))
    converted = from_ucf_vit(ucf_checkpoint(state))  # fsdp mode: no "module." prefix
    model.load_state_dict(converted)  # strict: every entry converts
    assert torch.equal(model.decoder_pos_embed, state["decoder_pos_embed"])
    assert torch.equal(model.blocks[1].attn.v.weight, state["blocks.1.attn.qkv.weight"][2 * d :])
    adaptive = dict(state, **{"token_embeds.0.weight": torch.ones(48)})
    with pytest.raises(WeightsError, match="LayerNorm-Linear-LayerNorm"):
        from_ucf_vit(ucf_checkpoint(adaptive))
    with pytest.raises(WeightsError, match="not a UCF-VIT checkpoint: expected a 'model_state_dict'"):
        from_ucf_vit({"model": state})


def test_position_tables_a_model_computes_itself_are_reported_with_the_fix(mae_checkpoint):
    _, state, _ = mae_checkpoint
    fixed = from_mae_reference({"model": state}, pos_embed="learned")  # the sin-cos table, kept as data
    trained = dict(fixed, pos_embed=fixed["pos_embed"] + 0.01)
    kwargs = {k: v for k, v in mae_kwargs().items() if not k.startswith(("decoder", "mask"))}
    model = build_model("vit", "debug", **kwargs, class_token=True, pos_embed="sincos")
    assert (
        load_pretrained(model, fixed).skipped["pos_embed"] == "the fixed sin-cos table, which the model computes itself"
    )
    assert "build it with pos_embed='learned'" in load_pretrained(model, trained).skipped["pos_embed"]
    rope = build_model("vit", "debug", **kwargs, class_token=True, pos_embed="none", rope=True)
    assert "no position table" in load_pretrained(rope, fixed).skipped["pos_embed"]
    with pytest.raises(WeightsError, match=r"x\.pth: not a weights layout ucfvit knows.*found keys \['weights'\]"):
        to_ucfvit_names({"weights": {}}, "x.pth")
