"""Masked autoencoder (He et al., 2022) for 2D and 3D images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from .encoder import EncoderDecoder
from .init import KeyedInit
from .patch_sequence import PatchSequence, decoder_positions, is_sequence, model_input, sequence_target, token_layout
from .patchify import patchify, unpatchify
from .ranges import FRACTION, Range
from .registry import FamilySpec, register_family
from .rng import RandomSource, rand
from .tasks import Reconstruction

__all__ = ["MAE"]


class MAE(EncoderDecoder):
    """Masks a random ``mask_ratio`` of the patches, encodes the rest, and reconstructs every patch.

    ``forward`` returns ``(pred, mask)``: ``pred`` (B, N, patch_size**ndim * C) in the layout of
    :meth:`patchify`, ``mask`` (B, N) with 1 on masked patches. :meth:`loss` is the MSE on masked
    patches (optionally against per-patch normalised targets), a mean over samples.

    Args:
        mask_ratio: fraction of patches hidden from the encoder, in [0, 1). The encoder keeps
            ``max(1, int(N * (1 - mask_ratio)))`` patches.
        norm_pix_loss: normalise each target patch by its mean and variance.
        linear_decoder, decoder_*: see :class:`~ucfvit.models.encoder.EncoderDecoder`.
        **encoder_kwargs: see :class:`~ucfvit.models.encoder.VisionTransformer`.
    """

    OPTION_RANGES: ClassVar[dict[str, Range]] = {
        "mask_ratio": FRACTION,
    }

    def __init__(self, *, mask_ratio: float = 0.75, norm_pix_loss: bool = False, **kwargs):
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={mask_ratio} must lie in [0, 1), e.g. 0.75")
        super().__init__(**kwargs)
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        width = self.embed_dim if self.linear_decoder else self.decoder_embed.out_features
        self.mask_token = nn.Parameter(torch.empty(1, 1, width))

    def _init_parameters(self, init: KeyedInit) -> None:
        super()._init_parameters(init)
        init.normal_(self.mask_token, std=0.02)

    def kept(self, num_tokens: int) -> int:
        """Tokens the encoder sees out of ``num_tokens``: ``max(1, int(N * (1 - mask_ratio)))`` (MAE reference rule)."""
        return max(1, int(num_tokens * (1 - self.mask_ratio)))

    @property
    def num_keep(self) -> int:
        """Patches the encoder sees: :meth:`kept` of ``num_patches``."""
        return self.kept(self.num_patches)

    def forward(
        self, x: torch.Tensor | PatchSequence, variables: Sequence[str] | None = None, *, rng: RandomSource = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, *img_size), or a PatchSequence if adaptive -> ``(pred, mask)``.

        Each sample keeps :meth:`kept` of its V valid patches (V = N without padding), chosen at
        random; pad tokens are never kept and never masked (mask 0, so no loss). The encoder runs
        on :meth:`kept` of N slots (a static shape); slots beyond a sample's own count are masked
        out of attention and replaced by the mask token before the decoder.
        """
        tokens = self.embed(x, variables)
        coords, valid = token_layout(self, x)
        (b, n, d), device = tokens.shape, tokens.device
        num_keep = self.kept(n)
        noise = rand(rng, (b, n), device)
        if valid is not None:
            noise = noise.masked_fill(~valid, 2.0)  # pad tokens sort after every valid one
        ids_shuffle = noise.argsort(dim=1, stable=True)  # stable: ties break by index everywhere
        ids_restore = ids_shuffle.argsort(dim=1)
        ids_keep = ids_shuffle[:, :num_keep]
        if valid is None:
            keep_count = torch.full((b, 1), num_keep, device=device)
        else:  # float64, as Python's int(V * (1 - ratio)) for an unpadded sequence of V tokens
            keep_count = (valid.sum(dim=1, keepdim=True).double() * (1 - self.mask_ratio)).long().clamp(min=1)
        slot = torch.arange(n, device=device).unsqueeze(0)
        kept_valid = None if valid is None else slot[:, :num_keep] < keep_count  # (B, num_keep)
        mask = (slot >= keep_count).float().gather(1, ids_restore)
        if valid is not None:
            mask = mask * valid
        kept = tokens.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        kept_coords = coords.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, self.ndim))
        latent, _ = self.encode(kept, kept_coords, rng, valid=kept_valid)

        # Decoder input: encoded visible tokens plus a shared mask token at every hidden patch,
        # put back in patch order. A linear decoder sees no context, so it predicts a constant there.
        y = latent if self.linear_decoder else self.decoder_embed(latent)
        p, width = self.num_prefix_tokens, y.shape[-1]
        token = self.mask_token.to(y.dtype)
        visible = y[:, p:] if kept_valid is None else torch.where(kept_valid.unsqueeze(-1), y[:, p:], token)
        restored = torch.cat([visible, token.expand(b, n - num_keep, -1)], dim=1)
        restored = restored.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, width))
        sequence = is_sequence(x)
        pos = decoder_positions(self, x, width) if sequence and not self.linear_decoder else None
        pred = self.decode(torch.cat([y[:, :p], restored], dim=1), coords, pos=pos, valid=valid)
        return self.select_channels(pred, x.patches.shape[2] if sequence else x.shape[1], variables), mask

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *img_size) -> (B, N, patch_size**ndim * C)."""
        return patchify(x, self.patch_size)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, patch_size**ndim * C) -> (B, C, *img_size)."""
        return unpatchify(tokens, self.patch_size, self.img_size)

    def targets(self, x: torch.Tensor | PatchSequence) -> torch.Tensor:
        """The patches to reconstruct (B, N, patch_size**ndim * C), in pixel values (not normalised)."""
        return sequence_target(x) if is_sequence(x) else self.patchify(x)

    def loss(self, x: torch.Tensor | PatchSequence, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE on masked patches: per-sample mean over masked patches, then mean over samples.
        ``x``: the input (images, or the PatchSequence whose patches are the targets)."""
        return self.sample_losses(x, pred, mask).mean()

    def sample_losses(self, x: torch.Tensor | PatchSequence, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The per-sample terms (B,) of :meth:`loss`."""
        target = self.targets(x)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = (pred - target).pow(2).mean(dim=-1)  # (B, N)
        return (per_patch * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)

    def pixels(self, x: torch.Tensor | PatchSequence, pred: torch.Tensor) -> torch.Tensor:
        """Predictions (B, N, ..) in pixel values: with ``norm_pix_loss`` each patch is mapped back
        through its target's mean and variance (as the MAE paper's visualisations do)."""
        if not self.norm_pix_loss:
            return pred
        target = self.targets(x)
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        return pred * (var + 1e-6).sqrt() + mean


def _reconstruction_loss(model: MAE, batch, rng: RandomSource, extra) -> torch.Tensor:
    x = model_input(model, batch)
    pred, mask = model(x, variables=batch.get("variables"), rng=rng)
    return model.loss(x, pred.float(), mask)


register_family(FamilySpec("mae", MAE, loss=_reconstruction_loss, evaluation=Reconstruction()))
