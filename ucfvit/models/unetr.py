"""UNETR (Hatamizadeh et al., 2022): ViT encoder + convolutional decoder with skip connections."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from .encoder import VisionTransformer
from .losses import segmentation_loss
from .patch_sequence import (
    PatchSequence,
    is_sequence,
    model_input,
    paint,
    paste,
    region_owner,
    sequence_target,
    token_layout,
)
from .patchify import unpatchify
from .ranges import AT_LEAST_1, Range
from .registry import FamilySpec, register_family
from .rng import RandomSource
from .tasks import Segmentation

__all__ = ["UNETR", "ConvBlock"]


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, never BatchNorm: the result must not depend on how a batch is split over ranks.
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ConvBlock(nn.Sequential):
    """Two 3x3(x3) convolutions, each followed by GroupNorm and LeakyReLU."""

    def __init__(self, in_ch: int, out_ch: int, ndim: int):
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        super().__init__(
            conv(in_ch, out_ch, 3, padding=1),
            _norm(out_ch),
            nn.LeakyReLU(0.01),
            conv(out_ch, out_ch, 3, padding=1),
            _norm(out_ch),
            nn.LeakyReLU(0.01),
        )


class _Up(nn.Sequential):
    """x2 transposed-convolution upsampling followed by a :class:`ConvBlock`."""

    def __init__(self, in_ch: int, out_ch: int, ndim: int):
        deconv = nn.ConvTranspose2d if ndim == 2 else nn.ConvTranspose3d
        super().__init__(deconv(in_ch, out_ch, 2, stride=2), ConvBlock(out_ch, out_ch, ndim))


class UNETRDecoder(nn.Module):
    """Upsamples encoder features by 2 per stage (log2(patch_size) stages), fusing at each
    resolution 1/2^j the encoder output of one intermediate block (``skips``), and the input image
    itself at full resolution."""

    def __init__(self, in_chans: int, embed_dim: int, feature_size: int, num_stages: int, ndim: int, skip: bool):
        super().__init__()
        ch = [feature_size * 2**j for j in range(num_stages)]  # channels at resolution 1/2^j
        self.skip = skip
        if skip:
            self.image_skip = ConvBlock(in_chans, ch[0], ndim)
            # skips[j-1] lifts block features from 1/2^num_stages to 1/2^j with (num_stages - j) upsamplings.
            self.skips = nn.ModuleList(
                nn.Sequential(*[_Up(embed_dim if k == 0 else ch[j], ch[j], ndim) for k in range(num_stages - j)])
                for j in range(1, num_stages)
            )
        deconv = nn.ConvTranspose2d if ndim == 2 else nn.ConvTranspose3d
        fuse_in = 2 if skip else 1
        self.ups = nn.ModuleList(
            deconv(embed_dim if j == num_stages - 1 else ch[j + 1], ch[j], 2, stride=2) for j in range(num_stages)
        )
        self.fuse = nn.ModuleList(ConvBlock(fuse_in * ch[j], ch[j], ndim) for j in range(num_stages))

    def forward(self, image: torch.Tensor, deepest: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``deepest``: final encoder features (B, D, *grid); ``features[j-1]``: tap for level j."""
        x = deepest
        for j in reversed(range(len(self.ups))):
            x = self.ups[j](x)
            if self.skip:
                level = self.image_skip(image) if j == 0 else self.skips[j - 1](features[j - 1])
                x = torch.cat([x, level], dim=1)
            x = self.fuse[j](x)
        return x


class UNETR(VisionTransformer):
    """Dense per-pixel/voxel classification: (B, C, *img_size) -> logits (B, num_classes, *img_size).

    Args:
        num_classes: output classes per pixel.
        feature_size: channels of the full-resolution decoder stage (doubling per halving).
        skip_connection: fuse intermediate encoder blocks and the image into the decoder.
        linear_decoder: replace the convolutional decoder by one linear map per token.
        class_token: as the encoder's, off by default (the decoder reads patch tokens only).
        **encoder_kwargs: see :class:`~ucfvit.models.encoder.VisionTransformer`.

    The convolutional decoder needs ``patch_size`` = 2^k (k >= 1); it taps the blocks at
    depth * i / k for i = 1..k-1 (blocks 3, 6, 9 of 12 for patch 16).
    """

    OPTION_RANGES: ClassVar[dict[str, Range]] = {
        "num_classes": AT_LEAST_1,
        "feature_size": AT_LEAST_1,
    }

    def __init__(
        self,
        *,
        num_classes: int = 2,
        feature_size: int = 16,
        skip_connection: bool = True,
        linear_decoder: bool = False,
        class_token: bool = False,
        **encoder_kwargs,
    ):
        super().__init__(class_token=class_token, **encoder_kwargs)
        if num_classes <= 0 or feature_size <= 0:
            raise ValueError(f"num_classes={num_classes} and feature_size={feature_size} must be positive")
        self.num_classes, self.linear_decoder = num_classes, linear_decoder
        if linear_decoder:
            self.head = nn.Linear(self.embed_dim, self.patch_size**self.ndim * num_classes)
            self.taps: tuple[int, ...] = ()
            return
        stages = int(math.log2(self.patch_size))
        if 2**stages != self.patch_size or stages < 1:
            raise ValueError(
                f"patch_size={self.patch_size}: UNETR's convolutional decoder needs a power of two "
                "(e.g. 16); use linear_decoder=True for other patch sizes"
            )
        # A shallow encoder (depth < stages) feeds the same block to several levels.
        self.taps = tuple(max(0, self.depth * i // stages - 1) for i in range(1, stages)) if skip_connection else ()
        self.decoder = UNETRDecoder(self.data_chans, self.embed_dim, feature_size, stages, self.ndim, skip_connection)
        self.head = (nn.Conv2d if self.ndim == 2 else nn.Conv3d)(feature_size, num_classes, 1)

    def forward(
        self, x: torch.Tensor, variables: Sequence[str] | None = None, *, rng: RandomSource = None
    ) -> torch.Tensor:
        if self.adaptive_patching or is_sequence(x):  # tokens painted over their regions' grid cells
            return self._forward_sequence(x, variables, rng)
        b = x.shape[0]
        tokens = self.embed(x, variables)
        out, tapped = self.encode(tokens, self.patch_coords(b, x.device), rng, taps=self.taps)
        p = self.num_prefix_tokens
        if self.linear_decoder:
            return unpatchify(self.head(out[:, p:]), self.patch_size, self.img_size)

        def to_grid(t: torch.Tensor) -> torch.Tensor:  # (B, P+N, D) -> (B, D, *grid)
            return t[:, p:].transpose(1, 2).reshape(b, self.embed_dim, *self.grid)

        if self.use_varemb:  # the image skip sees every declared variable, absent ones as zeros
            idx = torch.tensor(self.variable_index(variables, x.shape[1]), device=x.device)
            x = x.new_zeros(b, self.data_chans, *self.img_size).index_copy(1, idx, x)
        features = self.decoder(x, to_grid(out), [to_grid(t) for t in tapped])
        return self.head(features)

    def _forward_sequence(self, seq: PatchSequence, variables, rng: RandomSource) -> torch.Tensor:
        """UNETR on a patch sequence -> dense logits (B, K, *img_size).

        Encoder tokens (and the skip taps) are painted over the patch-grid cells their regions cover
        (:func:`~ucfvit.models.patch_sequence.region_owner`), the image skip sees the patches pasted
        back at full resolution, and the convolutional decoder runs as on a regular grid. With
        ``linear_decoder`` each token's prediction is pasted back like SAP's.
        """
        tokens = self.embed(seq, variables)
        centres, valid = token_layout(self, seq)
        out, tapped = self.encode(tokens, centres, rng, taps=self.taps, valid=valid)
        p = self.num_prefix_tokens
        if self.linear_decoder:
            return paste(self.head(out[:, p:]), seq.coords, seq.sizes, self.img_size, self.patch_size, valid)
        owner = region_owner(seq, self.img_size, self.patch_size)
        image = paste(sequence_target(seq), seq.coords, seq.sizes, self.img_size, self.patch_size, valid)
        grid = [paint(t[:, p:], owner, self.grid) for t in tapped]
        return self.head(self.decoder(image.to(out.dtype), paint(out[:, p:], owner, self.grid), grid))


def _segmentation_loss(model: UNETR, batch, rng: RandomSource, extra) -> torch.Tensor:
    return segmentation_loss(model(model_input(model, batch), variables=batch.get("variables"), rng=rng), batch["seg"])


register_family(
    FamilySpec(
        "unetr",
        UNETR,
        loss=_segmentation_loss,
        recipe={"arch.num_classes": 3},
        needs=("seg",),
        evaluation=Segmentation(),
    )
)
