"""DiffusionViT's DDPM (ucfvit.models.diffusion) beyond shapes: the noise schedules against their
closed forms, adding and removing noise, and the DDPM and DDIM samplers. Shapes and gradients of
every family: test_models.py."""

from __future__ import annotations

import pytest
import torch

from conftest import IMG
from ucfvit.models import DDPMScheduler, build_model


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
