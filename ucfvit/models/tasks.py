"""What a family measures on held-out data, and what it shows: one :class:`Task` per kind of model.

A family's :class:`~ucfvit.models.FamilySpec` names its task (``evaluation=``), so evaluation code
never asks which family it runs. A task turns a batch into **per-sample values** whose sums make
its metrics (:meth:`Task.evaluate`): losses, hits, confusion matrices, pixel sums. Sums over
shards add up to the sums over the whole data, so an evaluation split over ranks is reduced
exactly with one all-reduce and then :meth:`Task.summarize` divides; a rank that pads its last
batch drops the padding's rows before summing. :meth:`Task.pictures` returns
:class:`Panel` columns that :mod:`ucfvit.eval.pictures` draws.

Plain PyTorch, like the models: the reduction over ranks lives in ``ucfvit.train``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ucfvit.eval.scores import confusion_matrices, dice_iou, psnr, ssim, topk_correct
from ucfvit.eval.sliding_window import sliding_window

from .losses import segmentation_losses
from .patch_sequence import is_sequence, paste
from .rng import RandomSource

__all__ = ["Classification", "Denoising", "EvalOptions", "Panel", "Reconstruction", "Segmentation", "Task"]

Inputs = Callable[[Mapping[str, torch.Tensor]], tuple]
"""``inputs(batch) -> tuple`` of positional forward arguments (the family's ``inputs`` with the
evaluation's data transform applied, e.g. the adaptive patching of each sample)."""


@dataclass(frozen=True)
class EvalOptions:
    """Evaluation choices that are not the data: diffusion sampling and sliding-window blending."""

    sampler: Literal["ddim", "ddpm", "none"] = "ddim"
    """Diffusion: deterministic DDIM with ``sample_steps`` steps, DDPM ancestral over all T steps, or no sampling."""
    sample_steps: int = 50
    """Diffusion: DDIM steps."""
    window_overlap: float = 0.5
    """Segmentation of inputs larger than the model's: overlap of neighbouring tiles."""
    window_weights: Literal["gaussian", "uniform"] = "gaussian"
    """Segmentation of inputs larger than the model's: blending weights of overlapping tiles."""


@dataclass(frozen=True)
class Panel:
    """One column of a picture: ``data`` (B, C, *S) images (``kind="image"``) or (B, *S) class maps
    drawn in colour over ``under`` (B, C, *S) (``"labels"``); ``regions`` (coords, sizes, valid)
    outlines adaptive patches on the image."""

    title: str
    data: torch.Tensor
    kind: Literal["image", "labels"] = "image"
    under: torch.Tensor | None = None
    regions: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None


class Task:
    """Evaluation of one kind of model. Subclasses define the three methods below."""

    larger_inputs = False
    """Whether :meth:`evaluate` takes inputs larger than the model's ``img_size`` (sliding window)."""

    def evaluate(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        inputs: Inputs,
        rng: RandomSource,
        extra: Any,
        options: EvalOptions,
    ) -> dict[str, torch.Tensor]:
        """Per-sample values (B, ...) of fixed trailing shapes, to be summed over samples."""
        raise NotImplementedError

    def summarize(self, totals: Mapping[str, torch.Tensor], count: int) -> dict[str, Any]:
        """Metrics (JSON values) from sums over ``count`` samples."""
        raise NotImplementedError

    def pictures(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        inputs: Inputs,
        rng: RandomSource,
        extra: Any,
        options: EvalOptions,
    ) -> list[Panel]:
        """Columns of the task's picture for the batch (empty: nothing to show)."""
        return []


def _forward(model: nn.Module, batch: Mapping[str, Any], args: tuple, rng: RandomSource):
    return model(*args, variables=batch.get("variables"), rng=rng)


def _means(totals: Mapping[str, torch.Tensor], count: int, names) -> dict[str, float]:
    return {n: float(totals[n]) / max(count, 1) for n in names}


def _regions(x) -> tuple | None:
    return (x.coords, x.sizes, x.valid) if is_sequence(x) else None


class Classification(Task):
    """Image labels: cross-entropy ``loss``, ``top1`` and ``top5`` accuracy (top-5 is 1 with at most
    5 classes)."""

    def evaluate(self, model, batch, inputs, rng, extra, options):
        logits = _forward(model, batch, inputs(batch), rng).float()
        hits = topk_correct(logits, batch["label"], (1, 5))
        loss = F.cross_entropy(logits, batch["label"], reduction="none")
        return {"loss": loss, "top1": hits[1], "top5": hits[5]}

    def summarize(self, totals, count):
        return _means(totals, count, ("loss", "top1", "top5"))


class Reconstruction(Task):
    """Masked autoencoding: the training ``loss``; ``mse_masked`` (pixel values on masked patches); and
    PSNR / SSIM of the reconstruction (visible patches kept, masked ones predicted) against the
    input, beside ``psnr_masked_input``: the input with its masked patches set to the mean of the
    visible ones, the baseline a model must beat. Ranges are per sample (max - min of the input)."""

    def _reconstruct(self, model, batch, inputs, rng):
        x = inputs(batch)[0]
        pred, mask = _forward(model, batch, (x,), rng)
        pred = pred.float()
        target = model.targets(x).float()
        pixels = model.pixels(x, pred)
        hidden = mask.unsqueeze(-1) > 0
        visible = ~hidden
        seen = (target * visible).sum((1, 2)) / (visible.sum((1, 2)) * target.shape[-1]).clamp(min=1)
        parts = {
            "recon": torch.where(hidden, pixels, target),
            "masked": torch.where(hidden, seen.view(-1, 1, 1), target),
            "input": target,
        }
        if is_sequence(x):  # regions drawn at their own size
            images = {
                k: paste(v, x.coords, x.sizes, model.img_size, model.patch_size, x.valid) for k, v in parts.items()
            }
        else:
            images = {k: model.unpatchify(v) for k, v in parts.items()}
        return x, pred, pixels, target, mask, images

    def evaluate(self, model, batch, inputs, rng, extra, options):
        x, pred, pixels, target, mask, images = self._reconstruct(model, batch, inputs, rng)
        per_patch = (pixels - target).pow(2).mean(-1)
        mse = (per_patch * mask).sum(1) / mask.sum(1).clamp(min=1)
        original = images["input"].double()
        spread = (original.flatten(1).amax(1) - original.flatten(1).amin(1)).clamp(min=1e-12)
        side = min(original.shape[2:])
        window = min(11, side if side % 2 else side - 1)  # the widest odd SSIM window that fits
        out = {
            "loss": model.sample_losses(x, pred, mask),
            "mse_masked": mse,
            "psnr": psnr(images["recon"], original, spread),
            "psnr_masked_input": psnr(images["masked"], original, spread),
        }
        if window >= 3:
            out["ssim"] = ssim(images["recon"], original, spread, window=window)
            out["ssim_masked_input"] = ssim(images["masked"], original, spread, window=window)
        return out

    def summarize(self, totals, count):
        return _means(totals, count, totals)

    def pictures(self, model, batch, inputs, rng, extra, options):
        x, *_, images = self._reconstruct(model, batch, inputs, rng)
        return [
            Panel("input", images["input"], regions=_regions(x)),
            Panel("masked", images["masked"]),
            Panel("reconstruction", images["recon"]),
        ]


class Segmentation(Task):
    """Per-pixel classes: the training ``loss``, per-class ``dice`` and ``iou`` (None for a class absent
    from both target and prediction), ``mean_dice`` over the foreground classes, ``mean_iou`` over
    all classes and ``pixel_accuracy``, from one confusion matrix summed over the data. Inputs larger
    than the model's ``img_size`` are segmented by sliding-window inference over model-sized tiles."""

    larger_inputs = True

    def _logits(self, model, batch, inputs, rng, options) -> torch.Tensor:
        image = batch["image"]
        if tuple(image.shape[2:]) == tuple(model.img_size):
            return _forward(model, batch, inputs(batch), rng).float()

        def tiles(x: torch.Tensor) -> torch.Tensor:  # eval mode: no randomness in the forward
            return _forward(model, batch, inputs({**batch, "image": x}), None).float()

        return sliding_window(tiles, image, model.img_size, options.window_overlap, options.window_weights)

    def evaluate(self, model, batch, inputs, rng, extra, options):
        logits = self._logits(model, batch, inputs, rng, options)
        seg = batch["seg"]
        return {
            "loss": segmentation_losses(logits, seg),
            "confusion": confusion_matrices(logits.argmax(1), seg, logits.shape[1]),
        }

    def summarize(self, totals, count):
        confusion = totals["confusion"]
        dice, iou = dice_iou(confusion)

        def listed(values: torch.Tensor) -> list[float | None]:
            return [None if math.isnan(v) else v for v in values.tolist()]

        def mean(values: torch.Tensor) -> float | None:
            kept = values[~values.isnan()]
            return float(kept.mean()) if kept.numel() else None

        return {
            "loss": float(totals["loss"]) / max(count, 1),
            "dice": listed(dice),
            "iou": listed(iou),
            "mean_dice": mean(dice[1:] if len(dice) > 1 else dice),
            "mean_iou": mean(iou),
            "pixel_accuracy": float(confusion.diagonal().sum() / confusion.sum().clamp(min=1)),
        }

    def pictures(self, model, batch, inputs, rng, extra, options):
        logits = self._logits(model, batch, inputs, rng, options)
        image = batch["image"]
        regions = _regions(inputs(batch)[0]) if tuple(image.shape[2:]) == tuple(model.img_size) else None
        return [
            Panel("input", image, regions=regions),
            Panel("labels", batch["seg"], kind="labels", under=image),
            Panel("prediction", logits.argmax(1), kind="labels", under=image),
        ]


class Denoising(Task):
    """Diffusion: the training ``loss`` (noise MSE at a random timestep per sample), and samples drawn
    from noise (``EvalOptions.sampler``) compared with the data per channel: ``sample_mean``,
    ``sample_std``, ``data_mean``, ``data_std`` (lists over channels, pooled over pixels and samples)."""

    def _samples(self, model, batch, x, rng, ddpm, options) -> torch.Tensor | None:
        if options.sampler == "none" or is_sequence(x):  # patch sequences are not sampled
            return None

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model(x_t, t, variables=batch.get("variables")).float()

        if options.sampler == "ddpm":
            return ddpm.sample(denoise, x.shape, device=x.device, rng=rng)
        return ddpm.ddim_sample(denoise, x.shape, options.sample_steps, device=x.device, rng=rng)

    def evaluate(self, model, batch, inputs, rng, extra, options):
        x = inputs(batch)[0]
        out = {"loss": model.noise_losses(x, extra, batch.get("variables"), rng=rng)}
        samples = self._samples(model, batch, x, rng, extra, options)
        if samples is not None:
            for name, values in (("sample", samples), ("data", x)):
                v = values.double().flatten(2)  # (B, C, pixels)
                out[f"{name}_sum"], out[f"{name}_sq"] = v.sum(2), v.pow(2).sum(2)
            out["pixels"] = torch.full((x.shape[0],), float(x[0, 0].numel()), dtype=torch.float64, device=x.device)
        return out

    def summarize(self, totals, count):
        out = {"loss": float(totals["loss"]) / max(count, 1)}
        if "pixels" in totals:
            n = totals["pixels"]
            for name in ("sample", "data"):
                mean = totals[f"{name}_sum"] / n
                std = (totals[f"{name}_sq"] / n - mean.pow(2)).clamp(min=0).sqrt()
                out[f"{name}_mean"], out[f"{name}_std"] = mean.tolist(), std.tolist()
        return out

    def pictures(self, model, batch, inputs, rng, extra, options):
        x = inputs(batch)[0]
        samples = self._samples(model, batch, x, rng, extra, options)
        return [] if samples is None else [Panel("data", x), Panel("sample", samples)]
