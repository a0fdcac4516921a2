"""Behaviour of each family beyond shapes: MAE masking, DDPM, UNETR/SAP wiring."""

from __future__ import annotations

import pytest
import torch

from conftest import IMG
from ucfvit.models import DDPMScheduler, build_model, grid_patches


# ---------------------------------------------------------------- MAE
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.75, 0.9, 0.99])
@pytest.mark.parametrize("ndim", [2, 3])
def test_mae_keeps_the_reference_number_of_tokens(ratio, ndim):
    model = build_model("mae", "debug", img_size=IMG[ndim], mask_ratio=ratio)
    n = model.num_patches
    keep = max(1, int(n * (1 - ratio)))
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    _, mask = model(torch.randn(3, 3, *IMG[ndim]))
    assert seen == [keep + model.num_prefix_tokens]
    assert mask.shape == (3, n) and (mask.sum(dim=1) == n - keep).all()


def test_same_generator_gives_the_same_mask():
    model = build_model("mae", "debug", img_size=IMG[2])
    x = torch.randn(4, 3, *IMG[2])
    _, m1 = model(x, rng=torch.Generator().manual_seed(3))
    _, m2 = model(x, rng=torch.Generator().manual_seed(3))
    _, m3 = model(x, rng=torch.Generator().manual_seed(4))
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert not torch.equal(m1[0], m1[1]), "each sample gets its own mask"


@pytest.mark.parametrize("linear", [False, True])
def test_mae_loss_counts_only_masked_patches(linear):
    model = build_model("mae", "debug", img_size=IMG[2], linear_decoder=linear)
    x = torch.randn(2, 3, *IMG[2])
    pred, mask = model(x)
    target = model.patchify(x)
    perfect_on_masked = torch.where(mask.bool().unsqueeze(-1), target, pred + 10.0)
    assert model.loss(x, perfect_on_masked, mask) == 0
    assert model.loss(x, pred, mask) > 0


def test_mae_norm_pix_loss_normalises_each_target_patch():
    model = build_model("mae", "debug", img_size=IMG[2], norm_pix_loss=True)
    x = torch.randn(2, 3, *IMG[2]) * 5 + 3
    target = model.patchify(x)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    mask = torch.ones(2, model.num_patches)
    assert model.loss(x, normed, mask) < 1e-10
    assert model.loss(x, target, mask) > 1


# ---------------------------------------------------------------- diffusion
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_alphas_cumprod_equals_closed_form(schedule):
    sched = DDPMScheduler(1000, schedule)
    t = torch.arange(1000, dtype=torch.float64)
    if schedule == "linear":
        betas = 1e-4 + (0.02 - 1e-4) * t / 999
        closed = torch.exp(torch.cumsum(torch.log1p(-betas), 0))
        torch.testing.assert_close(sched.alphas_cumprod, closed, rtol=1e-12, atol=0)
    else:
        f = lambda s: torch.cos((s / 1000 + 0.008) / 1.008 * torch.pi / 2) ** 2  # noqa: E731
        closed = f(t + 1) / f(torch.zeros(1, dtype=torch.float64))
        unclipped = sched.betas < 0.999  # clipping only touches the last steps
        assert unclipped[:990].all()
        torch.testing.assert_close(sched.alphas_cumprod[:990], closed[:990], rtol=1e-10, atol=0)


def test_add_noise_then_inverse_recovers_x0():
    sched = DDPMScheduler(1000, "cosine")
    x0, noise = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randn(4, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    xt = sched.add_noise(x0, noise, t)  # exact in float64 even at t=999, where abar ~ 1e-9
    torch.testing.assert_close(sched.predict_x0(xt, noise, t), x0, rtol=1e-7, atol=1e-7)
    x0, noise = x0.float(), noise.float()
    t = torch.tensor([0, 10, 300, 500])  # float32: the 1/sqrt(abar) amplification stays small
    torch.testing.assert_close(sched.predict_x0(sched.add_noise(x0, noise, t), noise, t), x0, rtol=1e-4, atol=1e-4)
    abar0 = sched.alphas_cumprod[0].float()
    torch.testing.assert_close(sched.add_noise(x0, noise, t)[0], abar0.sqrt() * x0[0] + (1 - abar0).sqrt() * noise[0])


def test_ddpm_step_with_the_true_noise_moves_towards_x0():
    sched = DDPMScheduler(50)
    x0, noise = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    t = 30
    xt = sched.add_noise(x0, noise, torch.full((2,), t))
    prev = sched.step(noise, t, xt, rng=torch.Generator().manual_seed(0))
    # The posterior mean of x_{t-1} given the true x0; the sample sits within a few stds of it.
    abar, abar_prev = sched.alphas_cumprod[t], sched.alphas_cumprod[t - 1]
    beta, alpha = sched.betas[t], sched.alphas[t]
    mean = (abar_prev.sqrt() * beta / (1 - abar)) * x0 + (alpha.sqrt() * (1 - abar_prev) / (1 - abar)) * xt
    std = (beta * (1 - abar_prev) / (1 - abar)).sqrt()
    assert ((prev - mean.float()).abs() / std).mean() < 1.0


def test_sampling_loop_runs_the_model_every_step():
    model = build_model("diffusion", "debug", img_size=IMG[2], time_steps=5).eval()
    sched = DDPMScheduler(5)
    seen = []
    sample = sched.sample(
        lambda x, t: seen.append(int(t[0])) or model(x, t), (2, 3, *IMG[2]), rng=torch.Generator().manual_seed(0)
    )
    assert seen == [4, 3, 2, 1, 0] and sample.shape == (2, 3, *IMG[2]) and sample.isfinite().all()


def _oracle(sched: DDPMScheduler, x0: torch.Tensor):
    """The exact noise predictor for data that is always ``x0``: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""

    def predict(x_t, t):
        abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1).to(x_t.dtype)
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()

    return predict


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_samplers_with_the_exact_noise_predictor_return_the_data(schedule):
    # With the true noise, DDPM's last step (t = 0) and every DDIM step recover x0 whatever the noise
    # drawn on the way: both samplers are then exact, which pins their update formulas.
    sched = DDPMScheduler(40, schedule)
    x0 = torch.randn(3, 2, 5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ddpm = sched.sample(_oracle(sched, x0), x0.shape, rng=torch.Generator().manual_seed(1)).double()
    torch.testing.assert_close(ddpm, x0, atol=1e-4, rtol=0)
    for steps in (1, 7, 40):
        visited, oracle = [], _oracle(sched, x0)

        def denoise(x, t, visited=visited, oracle=oracle):
            visited.append(int(t[0]))
            return oracle(x, t)

        ddim = sched.ddim_sample(denoise, x0.shape, steps, rng=torch.Generator().manual_seed(2))
        torch.testing.assert_close(ddim.double(), x0, atol=1e-4, rtol=0)
        assert visited == sched.ddim_timesteps(steps) and visited[0] == 39 and len(visited) == steps


def test_ddim_is_deterministic_given_its_noise_and_refuses_bad_step_counts():
    sched = DDPMScheduler(20)
    model = build_model("diffusion", "debug", img_size=IMG[2], time_steps=20).eval()
    runs = [sched.ddim_sample(model, (2, 3, *IMG[2]), 5, rng=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*runs)
    for bad in (0, 21):
        with pytest.raises(ValueError, match=r"steps=.* must lie in \[1, 20\]"):
            sched.ddim_sample(model, (1, 3, *IMG[2]), bad)


# ---------------------------------------------------------------- UNETR / SAP wiring
@pytest.mark.parametrize("ndim", [2, 3])
def test_unetr_skip_connections_are_wired(ndim):
    size = (32,) * ndim if ndim == 2 else (16,) * 3
    model = build_model("unetr", "debug", img_size=size, patch_size=8, depth=3).eval()
    assert len(model.decoder.skips) == 2 and model.taps == (0, 1)
    x = torch.randn(1, 3, *size)
    base = model(x)
    for module in [model.decoder.image_skip, *model.decoder.skips]:
        handle = module.register_forward_hook(lambda m, i, out: out + 1.0)
        assert not torch.allclose(model(x), base), f"{module} does not reach the output"
        handle.remove()
    no_skip = build_model("unetr", "debug", img_size=size, patch_size=8, skip_connection=False)
    assert not hasattr(no_skip.decoder, "skips") and no_skip(x).shape == base.shape


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_unetr_with_fewer_blocks_than_decoder_stages_reuses_blocks(depth):
    model = build_model("unetr", "debug", img_size=(32, 32), patch_size=16, depth=depth)  # 4 stages, 3 taps
    assert len(model.taps) == 3 and all(0 <= t < depth for t in model.taps)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2, 32, 32)


def test_unetr_taps_follow_the_paper_for_depth_12_patch_16():
    with torch.device("meta"):
        model = build_model("unetr", "base", img_size=(64, 64))
    assert model.taps == (2, 5, 8)  # blocks 3, 6, 9 (1-based) feed the decoder


def test_sap_output_depends_on_patch_positions_and_sizes():
    model = build_model("sap", "debug", img_size=IMG[2]).eval()
    x = torch.randn(1, 3, *IMG[2])
    patches, coords, sizes, _ = grid_patches(x, 4)
    base = model(patches, coords, sizes)
    swapped = coords.clone()
    swapped[:, [0, 5]] = coords[:, [5, 0]]
    moved = model(patches, swapped, sizes)
    assert not torch.allclose(moved, base)
    bigger = sizes.clone()
    bigger[:, 0] = 8  # same corner, larger region: the size embedding changes every prediction
    assert not torch.allclose(model(patches, coords, bigger)[..., 8:, 8:], base[..., 8:, 8:])


def test_sap_pastes_mixed_region_sizes_into_the_right_place():
    model = build_model("sap", "debug", img_size=(16, 16), num_classes=1, depth=1).eval()
    # One 8x8 region (top-left) + 12 regions of 4x4 tile the 16x16 image.
    coords = [[0, 0]] + [[r, c] for r in range(0, 16, 4) for c in range(0, 16, 4) if r >= 8 or c >= 8]
    sizes = [8] + [4] * 12
    coords_t, sizes_t = torch.tensor([coords]), torch.tensor([sizes])
    pred = torch.arange(13, dtype=torch.float32).view(1, 13, 1).expand(1, 13, 16).clone()  # constant per patch
    dense = model.paste(pred, coords_t, sizes_t)
    assert dense.shape == (1, 1, 16, 16)
    assert (dense[0, 0, :8, :8] == 0).all()
    for i, (r, c) in enumerate(coords[1:], start=1):
        assert (dense[0, 0, r : r + 4, c : c + 4] == i).all()
    out = model(torch.randn(1, 13, 3, 4, 4), coords_t, sizes_t)
    assert out.shape == (1, 1, 16, 16) and out.isfinite().all()
