"""Masked autoencoder (He et al., 2022) for 2D and 3D images."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .adaptive import is_sequence, mae_forward, model_input, sequence_target
from .encoder import EncoderDecoder, shuffle_indices
from .patches import patchify, unpatchify
from .registry import FamilySpec, register_family
from .rng import RandomSource

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

    def __init__(self, *, mask_ratio: float = 0.75, norm_pix_loss: bool = False, **kwargs):
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={mask_ratio} must lie in [0, 1), e.g. 0.75")
        super().__init__(**kwargs)
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        width = self.embed_dim if self.linear_decoder else self.decoder_embed.out_features
        self.mask_token = nn.Parameter(torch.empty(1, 1, width))

    def _init_parameters(self) -> None:
        super()._init_parameters()
        nn.init.normal_(self.mask_token, std=0.02)

    @property
    def num_keep(self) -> int:
        """Patches the encoder sees: ``max(1, int(N * (1 - mask_ratio)))`` (MAE reference rule)."""
        return max(1, int(self.num_patches * (1 - self.mask_ratio)))

    def random_masking(self, batch: int, device: torch.device, rng: RandomSource = None):
        """Per-sample random permutation of patches: returns (ids_keep (B, K), ids_restore (B, N), mask (B, N))."""
        ids_shuffle = shuffle_indices(rng, batch, self.num_patches, device)
        ids_restore = ids_shuffle.argsort(dim=1)
        ids_keep = ids_shuffle[:, : self.num_keep]
        mask = torch.ones(batch, self.num_patches, device=device)
        mask[:, : self.num_keep] = 0
        return ids_keep, ids_restore, mask.gather(1, ids_restore)

    def forward(
        self, x: torch.Tensor, variables: Sequence[str] | None = None, *, rng: RandomSource = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.adaptive_patching or is_sequence(x):  # masking among the valid patches of a PatchSequence
            pred, mask = mae_forward(self, x, variables, rng)
            return self.select_channels(pred, x.patches.shape[2], variables), mask
        b = x.shape[0]
        tokens = self.embed(x, variables)
        ids_keep, ids_restore, mask = self.random_masking(b, x.device, rng)
        d = tokens.shape[-1]
        kept = tokens.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        coords = self.patch_coords(b, x.device)
        kept_coords = coords.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, self.ndim))
        latent, _ = self.encode(kept, kept_coords, rng)

        # Decoder input: encoded visible tokens plus a shared mask token at every hidden patch,
        # put back in patch order. A linear decoder sees no context, so it predicts a constant there.
        y = latent if self.linear_decoder else self.decoder_embed(latent)
        p, width = self.num_prefix_tokens, y.shape[-1]
        patches = torch.cat([y[:, p:], self.mask_token.expand(b, self.num_patches - self.num_keep, -1)], dim=1)
        patches = patches.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, width))
        pred = self.decode(torch.cat([y[:, :p], patches], dim=1), coords)
        return self.select_channels(pred, x.shape[1], variables), mask

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *img_size) -> (B, N, patch_size**ndim * C)."""
        return patchify(x, self.patch_size)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, patch_size**ndim * C) -> (B, C, *img_size)."""
        return unpatchify(tokens, self.patch_size, self.img_size)

    def loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE on masked patches: per-sample mean over masked patches, then mean over samples.
        ``x``: the input (images, or the PatchSequence whose patches are the targets)."""
        target = sequence_target(x) if is_sequence(x) else self.patchify(x)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = (pred - target).pow(2).mean(dim=-1)  # (B, N)
        per_sample = (per_patch * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return per_sample.mean()


def _reconstruction_loss(model: MAE, batch, rng: RandomSource, extra) -> torch.Tensor:
    x = model_input(model, batch)
    pred, mask = model(x, rng=rng)
    return model.loss(x, pred.float(), mask)


register_family(FamilySpec("mae", MAE, loss=_reconstruction_loss))
