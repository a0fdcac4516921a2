"""SAP: symmetric adaptive patching for dense segmentation (Zhang et al., 2024).

An image is cut into a fixed number ``L`` of square (cubic) regions of varying side, each resized
to ``patch_size``, given as a :class:`~ucfvit.models.patch_sequence.PatchSequence`. A quadtree/octree
patcher is meant to produce the regions; today :func:`grid_patches` gives the regular-grid case
(every region of side ``patch_size``) and any caller may build sequences of mixed sizes. The
model embeds these patches with their continuous positions and sizes, predicts ``num_classes``
logits for every pixel of every resized patch, and pastes each prediction back, resized to its
region: the de-patching mirrors the patching, so the output is a dense map of the original image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from .encoder import LEARNED_POS_EMBEDS, EncoderDecoder
from .losses import segmentation_loss
from .patch_sequence import (
    PatchSequence,
    batch_sequence,
    decoder_positions,
    grid_patches,
    is_sequence,
    paste,
    token_layout,
)
from .ranges import AT_LEAST_1, Range
from .registry import FamilySpec, register_family
from .rng import RandomSource
from .tasks import Segmentation

__all__ = ["SAP", "grid_patches"]


class SAP(EncoderDecoder):
    """Adaptive-patch segmentation: a :class:`~ucfvit.models.patch_sequence.PatchSequence` (or the
    tensors ``patches, coords, sizes``) -> logits (B, num_classes, *img_size). Pad tokens
    (``valid`` False) are not attended to and not pasted.

    Args:
        num_classes: classes per pixel.
        fixed_length: tokens per sample ``L`` (checked in forward when set; pad shorter sequences).
        class_token: as the encoder's, off by default (the decoder reads patch tokens only).
        adaptive_patching: always True: SAP takes patch sequences (``False`` is refused).
        decoder_*, linear_decoder: the token decoder, see :class:`~ucfvit.models.encoder.EncoderDecoder`.
        **encoder_kwargs: see :class:`~ucfvit.models.encoder.VisionTransformer`;
            ``img_size`` is the size of the dense output. Positions are continuous, so
            ``pos_embed`` is ``"sincos"`` (of region centres and sizes) or ``"none"`` (e.g. with
            ``rope=True``); ``use_varemb`` embeds each channel of a patch with its variable's
            weights and aggregates, ``single_channel`` takes one-channel patches plus the
            variable's embedding.
    """

    OPTION_RANGES: ClassVar[dict[str, Range]] = {
        "num_classes": AT_LEAST_1,
        "fixed_length": AT_LEAST_1,
    }

    def __init__(
        self,
        *,
        num_classes: int = 2,
        fixed_length: int | None = None,
        class_token: bool = False,
        adaptive_patching: bool = True,
        **kwargs,
    ):
        if not adaptive_patching:
            raise ValueError(
                "SAP takes adaptive patch sequences only, so adaptive_patching=False is not an option; "
                "for images on the regular grid use UNETR"
            )
        if num_classes <= 0:
            raise ValueError(f"num_classes={num_classes} must be positive")
        if kwargs.get("pos_embed") in LEARNED_POS_EMBEDS:
            raise ValueError(
                f"SAP does not support pos_embed={kwargs['pos_embed']!r}: its regions have continuous positions and "
                "sizes, not grid rows; use pos_embed='sincos' (fixed), use_adaptive_pos_emb=True (learned) or "
                "pos_embed='none' with rope=True"
            )
        super().__init__(
            out_chans=num_classes, fixed_length=fixed_length, class_token=class_token, adaptive_patching=True, **kwargs
        )
        self.num_classes = num_classes

    def forward(
        self,
        patches: PatchSequence | torch.Tensor,
        coords: torch.Tensor | None = None,
        sizes: torch.Tensor | None = None,
        variables: Sequence[str] | None = None,
        *,
        rng: RandomSource = None,
    ) -> torch.Tensor:
        if is_sequence(patches) and (coords is not None or sizes is not None):
            raise TypeError("SAP(PatchSequence) takes no coords/sizes; pass variables= by keyword")
        seq = patches if is_sequence(patches) or coords is None else PatchSequence(patches, coords, sizes)
        tokens = self.embed(seq, variables)
        centres, valid = token_layout(self, seq)
        latent, _ = self.encode(tokens, centres, rng, valid=valid)
        if self.linear_decoder:
            pred = self.decode(latent, centres, valid=valid)
        else:
            y = self.decoder_embed(latent)
            pred = self.decode(y, centres, pos=decoder_positions(self, seq, y.shape[-1]), valid=valid)
        return self.paste(pred, seq.coords, seq.sizes, valid)

    def paste(
        self, pred: torch.Tensor, coords: torch.Tensor, sizes: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-patch predictions (B, L, patch_size**ndim * K) -> dense (B, K, *img_size).

        Each patch's K x patch_size**ndim prediction is resized (bi/trilinear) to its region's side
        and written at its corner; pad tokens (``valid`` False) are skipped. Regions must tile the
        image without overlap (see :func:`ucfvit.models.patch_sequence.paste`).
        """
        return paste(pred, coords, sizes, self.img_size, self.patch_size, valid)


def _patch_input(model: SAP, batch) -> tuple:
    """The batch's patch sequence, or images on a regular grid (see ``patch_sequence.batch_sequence``)."""
    return (batch_sequence(model, batch),)


def _segmentation_loss(model: SAP, batch, rng: RandomSource, extra) -> torch.Tensor:
    logits = model(*_patch_input(model, batch), variables=batch.get("variables"), rng=rng)
    return segmentation_loss(logits, batch["seg"])


# The recipe trains on quadtree/octree patches (--data.patching tree): 46 = 1 + 3 * 15 regions tile the
# debug preset's 32x32 images (8x8 cells of patch 4) exactly, and 224x224 images with patch 16 too.
register_family(
    FamilySpec(
        "sap",
        SAP,
        loss=_segmentation_loss,
        inputs=_patch_input,
        recipe={"arch.num_classes": 3, "arch.fixed_length": 46},
        needs=("seg",),
        evaluation=Segmentation(),
    )
)
