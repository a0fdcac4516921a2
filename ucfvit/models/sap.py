"""SAP: symmetric adaptive patching for dense segmentation (Zhang et al., 2024).

An image is cut (e.g. by a quadtree, see ``ucfvit.data``) into a fixed number ``L`` of square
(cubic) regions of varying side, each resized to ``patch_size``. The model embeds these patches
with their continuous positions and sizes, predicts ``num_classes`` logits for every pixel of
every resized patch, and pastes each prediction back, resized to its region: the de-patching
mirrors the patching, so the output is a dense map of the original image size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .embed import sincos_embed
from .encoder import EncoderDecoder
from .rng import RandomSource

__all__ = ["SAP", "grid_patches"]


def grid_patches(x: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Regular-grid tokenisation in SAP's input format (every region of side ``patch_size``).

    Returns ``patches`` (B, L, C, *[patch_size]*ndim), ``coords`` (B, L, ndim) top-left corners in
    pixels, ``sizes`` (B, L) region sides in pixels.
    """
    b, c, *spatial = x.shape
    ndim, p = len(spatial), patch_size
    if p <= 0 or any(s % p for s in spatial):
        raise ValueError(
            f"grid_patches: image of spatial shape {tuple(spatial)} is not divisible by patch_size={p}; "
            f"crop or pad it to e.g. {tuple(max(s // p, 1) * p for s in spatial) if p > 0 else spatial}"
        )
    grid = [s // p for s in spatial]
    # (B, C, g0, p, g1, p[, g2, p]) -> (B, g0, g1[, g2], C, p, p[, p])
    split = x.reshape(b, c, *[v for g in grid for v in (g, p)])
    order = [0, *range(2, 2 + 2 * ndim, 2), 1, *range(3, 3 + 2 * ndim, 2)]
    patches = split.permute(order).reshape(b, -1, c, *([p] * ndim))
    axes = [torch.arange(g, device=x.device) * p for g in grid]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(1, -1, ndim).expand(b, -1, -1)
    sizes = torch.full(coords.shape[:2], p, device=x.device, dtype=torch.long)
    return patches, coords, sizes


class SAP(EncoderDecoder):
    """Adaptive-patch segmentation: (patches, coords, sizes) -> logits (B, num_classes, *img_size).

    Args:
        num_classes: classes per pixel.
        fixed_length: expected sequence length ``L`` (checked in forward when set).
        decoder_*, linear_decoder: the token decoder, see :class:`~ucfvit.models.encoder.EncoderDecoder`.
        **encoder_kwargs: see :class:`~ucfvit.models.encoder.VisionTransformer`;
            ``img_size`` is the size of the dense output. Positions are continuous, so
            ``pos_embed`` is ``"sincos"`` (of region centres and sizes) or ``"none"`` (e.g. with
            ``rope=True``); ``use_varemb`` embeds each channel of a patch with its variable's
            weights and aggregates, ``single_channel`` takes one-channel patches plus the
            variable's embedding.
    """

    def __init__(self, *, num_classes: int = 2, fixed_length: int | None = None, **kwargs):
        if num_classes <= 0:
            raise ValueError(f"num_classes={num_classes} must be positive")
        if fixed_length is not None and fixed_length <= 0:
            raise ValueError(f"fixed_length={fixed_length} must be positive")
        kwargs.setdefault("class_token", False)
        kwargs["adaptive_patching"] = True
        super().__init__(out_chans=num_classes, **kwargs)
        self.num_classes, self.fixed_length = num_classes, fixed_length

    def _position(self, coords: torch.Tensor, sizes: torch.Tensor, dim: int) -> torch.Tensor:
        """Sin-cos embedding of region centres (in patch units) plus of log2(size / patch_size)."""
        centres = (coords.float() + sizes.unsqueeze(-1).float() / 2) / self.patch_size - 0.5
        scale = torch.log2(sizes.float() / self.patch_size).unsqueeze(-1)
        return sincos_embed(centres, dim) + sincos_embed(scale, dim)

    def forward(
        self,
        patches: torch.Tensor,
        coords: torch.Tensor,
        sizes: torch.Tensor,
        variables: Sequence[str] | None = None,
        *,
        rng: RandomSource = None,
    ) -> torch.Tensor:
        b, length = patches.shape[:2]
        if self.fixed_length is not None and length != self.fixed_length:
            raise ValueError(f"got {length} patches per image, the model was built with fixed_length={self.fixed_length}")
        if tuple(patches.shape[3:]) != (self.patch_size,) * self.ndim:
            raise ValueError(
                f"patches of shape {tuple(patches.shape[3:])} must be resized to patch_size={self.patch_size}"
            )
        tokens = self.embed_channels(patches, variables)
        if self.pos_embed_kind == "sincos":
            tokens = tokens + self._position(coords, sizes, self.embed_dim).to(tokens.dtype)
        centres = (coords.float() + sizes.unsqueeze(-1).float() / 2) / self.patch_size
        latent, _ = self.encode(tokens, centres, rng)
        if self.linear_decoder:
            pred = self.decode(latent, centres)
        else:
            y = self.decoder_embed(latent)
            pos = self._position(coords, sizes, y.shape[-1]) if self.pos_embed_kind == "sincos" else None
            pred = self.decode(y, centres, pos=pos)
        return self.paste(pred, coords, sizes)

    def paste(self, pred: torch.Tensor, coords: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """Per-patch predictions (B, L, patch_size**ndim * K) -> dense (B, K, *img_size).

        Each patch's K x patch_size**ndim prediction is resized (bi/trilinear) to its region's side
        and written at its corner. Regions must tile the image without overlap.
        """
        b, length = pred.shape[:2]
        k, p, nd = self.num_classes, self.patch_size, self.ndim
        # patchify layout is (p, p[, p], K): move K first for interpolation.
        per_patch = pred.reshape(b * length, *([p] * nd), k).movedim(-1, 1)
        flat_coords, flat_sizes = coords.reshape(-1, nd), sizes.reshape(-1)
        batch_of = torch.arange(b, device=pred.device).repeat_interleave(length)
        strides = [1] * nd
        for a in range(nd - 2, -1, -1):
            strides[a] = strides[a + 1] * self.img_size[a + 1]
        strides_t = torch.tensor(strides, device=pred.device)
        pixels = torch.tensor(self.img_size, device=pred.device).prod()
        out = pred.new_zeros(b * int(pixels), k)
        mode = "bilinear" if nd == 2 else "trilinear"
        for side in torch.unique(flat_sizes).tolist():  # one resize per region size (a few quadtree levels)
            sel = (flat_sizes == side).nonzero().squeeze(1)
            values = F.interpolate(per_patch[sel], size=(side,) * nd, mode=mode, align_corners=False)
            offsets = torch.stack(
                torch.meshgrid(*[torch.arange(side, device=pred.device)] * nd, indexing="ij"), -1
            ).reshape(-1, nd)  # (side**nd, nd)
            pix = flat_coords[sel].unsqueeze(1) + offsets  # (M, side**nd, nd)
            index = batch_of[sel].unsqueeze(1) * pixels + (pix * strides_t).sum(-1)
            out = out.index_put((index.reshape(-1),), values.flatten(2).transpose(1, 2).reshape(-1, k))
        return out.view(b, *self.img_size, k).movedim(-1, 1)
