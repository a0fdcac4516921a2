"""DiffusionViT (a ViT noise predictor) and the DDPM scheduler (Ho et al., 2020)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import nn

from .embed import timestep_embed
from .encoder import EncoderDecoder
from .patch_sequence import (
    PatchSequence,
    decoder_positions,
    is_sequence,
    masked_mean,
    model_input,
    sequence_from_tokens,
    token_layout,
)
from .patchify import unpatchify
from .ranges import AT_LEAST_1, Range
from .registry import FamilySpec, register_family
from .rng import RandomSource, rand, randn
from .tasks import Denoising

__all__ = ["DiffusionViT", "DDPMScheduler", "BETA_SCHEDULES"]

BETA_SCHEDULES = ("linear", "cosine")


class DiffusionViT(EncoderDecoder):
    """Predicts the noise in a noised image: ``forward(x_t, t)`` -> (B, C, *img_size), the
    channels of ``x_t`` (with ``use_varemb``, a subset of the declared variables in any order).

    The timestep enters through a sinusoidal embedding and an MLP (``time_embed``), added to
    every patch token before the encoder blocks.

    Args:
        time_steps: length of the diffusion process the model is trained for.
        class_token: as the encoder's, off by default (every token is a patch to denoise).
        decoder_*, linear_decoder: see :class:`~ucfvit.models.encoder.EncoderDecoder`.
        **encoder_kwargs: see :class:`~ucfvit.models.encoder.VisionTransformer`.
    """

    OPTION_RANGES: ClassVar[dict[str, Range]] = {
        "time_steps": AT_LEAST_1,
    }

    def __init__(self, *, time_steps: int = 1000, class_token: bool = False, **kwargs):
        if time_steps <= 0:
            raise ValueError(f"time_steps={time_steps} must be positive")
        super().__init__(class_token=class_token, **kwargs)
        self.time_steps = time_steps
        d = self.embed_dim
        self.time_embed = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        variables: Sequence[str] | None = None,
        *,
        rng: RandomSource = None,
    ) -> torch.Tensor:
        """Noised images (B, C, *img_size) -> predicted noise of the same shape; for adaptive models a
        noised PatchSequence -> the noise per token, shaped like its ``patches``."""
        t_freq = timestep_embed(t, self.embed_dim).to(self.time_embed[0].weight.dtype)  # bf16 under mixed precision
        tokens = self.embed(x, variables) + self.time_embed(t_freq).unsqueeze(1)
        coords, valid = token_layout(self, x)
        latent, _ = self.encode(tokens, coords, rng, valid=valid)
        y = latent if self.linear_decoder else self.decoder_embed(latent)
        if is_sequence(x):
            pos = None if self.linear_decoder else decoder_positions(self, x, y.shape[-1])
            channels = x.patches.shape[2]
            pred = self.select_channels(self.decode(y, coords, pos=pos, valid=valid), channels, variables)
            return sequence_from_tokens(pred, channels, self.patch_size, self.ndim)
        pred = self.select_channels(self.decode(y, coords), x.shape[1], variables)
        # contiguous(): return a fresh tensor rather than a permuted view of the decoder output.
        return unpatchify(pred, self.patch_size, self.img_size).contiguous()

    def noise_losses(
        self,
        x: torch.Tensor | PatchSequence,
        ddpm: DDPMScheduler,
        variables: Sequence[str] | None = None,
        *,
        rng: RandomSource = None,
    ) -> torch.Tensor:
        """Per-sample training loss (B,): the MSE of the predicted noise at a random timestep per
        sample (both drawn from ``rng``), a mean over the sample's pixels (valid tokens of a sequence)."""
        clean = x.patches if is_sequence(x) else x
        t = (rand(rng, (clean.shape[0],), clean.device) * ddpm.num_steps).long().clamp(max=ddpm.num_steps - 1)
        noise = randn(rng, clean.shape, clean.device)
        noised = ddpm.add_noise(clean, noise, t)
        noised = x._replace(patches=noised) if is_sequence(x) else noised
        error = (self(noised, t, variables=variables, rng=rng).float() - noise).pow(2)
        if is_sequence(x):
            return masked_mean(error.flatten(2).mean(dim=-1), x.valid)
        return error.flatten(1).mean(dim=1)


class DDPMScheduler:
    """Noise schedule, forward noising and ancestral sampling of DDPM.

    Args:
        num_steps: diffusion steps T.
        schedule: ``"linear"`` betas from ``beta_start`` to ``beta_end`` (Ho et al.) or
            ``"cosine"`` alpha-bar (Nichol & Dhariwal, 2021), betas clipped at 0.999.
    """

    def __init__(
        self,
        num_steps: int = 1000,
        schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        cosine_s: float = 0.008,
    ):
        if num_steps <= 0:
            raise ValueError(f"num_steps={num_steps} must be positive")
        if schedule not in BETA_SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is unknown; choose one of {BETA_SCHEDULES}")
        self.num_steps, self.schedule = num_steps, schedule
        if schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        else:
            steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
            f = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    def to(self, device: torch.device | str) -> DDPMScheduler:
        """Keep the tables on ``device`` (the model's), so a step reads them without a host-to-device copy."""
        self.betas, self.alphas, self.alphas_cumprod = (
            v.to(device) for v in (self.betas, self.alphas, self.alphas_cumprod)
        )
        return self

    def _at(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] shaped to broadcast against ``like`` (B, ...)."""
        out = values.to(like.device)[t.to(like.device)].to(like.dtype)
        return out.view(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        abar = self._at(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Exact inverse of :meth:`add_noise` given the noise."""
        abar = self._at(self.alphas_cumprod, t, x_t)
        return (x_t - (1 - abar).sqrt() * noise) / abar.sqrt()

    def step(self, noise_pred: torch.Tensor, t: int, x_t: torch.Tensor, rng: RandomSource = None) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1} (no noise is added at t = 0); the noise comes from ``rng``."""
        tt = torch.full((x_t.shape[0],), t, dtype=torch.long)
        beta, alpha, abar = (self._at(v, tt, x_t) for v in (self.betas, self.alphas, self.alphas_cumprod))
        mean = (x_t - beta / (1 - abar).sqrt() * noise_pred) / alpha.sqrt()
        if t == 0:
            return mean
        abar_prev = self._at(self.alphas_cumprod, tt - 1, x_t)
        var = beta * (1 - abar_prev) / (1 - abar)
        return mean + var.sqrt() * randn(rng, x_t.shape, x_t.device).to(x_t.dtype)

    @torch.no_grad()
    def sample(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        shape: Sequence[int],
        *,
        device: torch.device | str = "cpu",
        rng: RandomSource = None,
    ) -> torch.Tensor:
        """DDPM ancestral sampling: noise of ``shape`` (from ``rng``) denoised by ``model(x_t, t)`` over all T steps."""
        x = randn(rng, tuple(shape), device)
        for t in reversed(range(self.num_steps)):
            tt = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
            x = self.step(model(x, tt), t, x, rng)
        return x

    def ddim_timesteps(self, steps: int) -> list[int]:
        """The ``steps`` timesteps DDIM visits, from T - 1 down to 0 (one step: T - 1 only), evenly spread."""
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"steps={steps} must lie in [1, {self.num_steps}] (the scheduler's T)")
        last = self.num_steps - 1
        return [round(last - i * last / (steps - 1)) if steps > 1 else last for i in range(steps)]

    @torch.no_grad()
    def ddim_sample(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        shape: Sequence[int],
        steps: int = 50,
        *,
        device: torch.device | str = "cpu",
        rng: RandomSource = None,
    ) -> torch.Tensor:
        """Deterministic DDIM sampling (Song et al. 2021, eta = 0) over :meth:`ddim_timesteps`: from noise
        of ``shape`` (drawn from ``rng``), each step predicts x_0 from ``model(x_t, t)`` and moves to the
        next visited timestep along the same noise; the last step returns the predicted x_0."""
        x = randn(rng, tuple(shape), device)
        visits = self.ddim_timesteps(steps)
        for t, prev in zip(visits, [*visits[1:], -1], strict=True):
            tt = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
            noise = model(x, tt).to(x.dtype)
            x0 = self.predict_x0(x, noise, tt)
            if prev < 0:
                return x0
            abar_prev = self._at(self.alphas_cumprod, torch.full_like(tt, prev), x)
            x = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * noise
        return x


def _timestep_input(model: DiffusionViT, batch) -> tuple:
    """A clean image and timesteps (``batch["t"]``, else spread over the process for the batch)."""
    x = model_input(model, batch)
    t = batch.get("t")
    if t is None:
        ref = x.patches if is_sequence(x) else x
        t = torch.arange(ref.shape[0], device=ref.device) * 7 % model.time_steps
    return x, t


def _noise_prediction_loss(model: DiffusionViT, batch, rng: RandomSource, ddpm: DDPMScheduler) -> torch.Tensor:
    return model.noise_losses(model_input(model, batch), ddpm, batch.get("variables"), rng=rng).mean()


register_family(
    FamilySpec(
        "diffusion",
        DiffusionViT,
        loss=_noise_prediction_loss,
        inputs=_timestep_input,
        extra=lambda model: DDPMScheduler(model.time_steps).to(next(model.parameters()).device),
        evaluation=Denoising(),
    )
)
