"""ViT for classification (Dosovitskiy et al., 2021), 2D or 3D."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adaptive import masked_mean, model_input, valid_of
from .encoder import VisionTransformer
from .registry import FamilySpec, register_family
from .rng import RandomSource, rand

__all__ = ["ViT"]


class ViT(VisionTransformer):
    """Image classifier: encoder -> pooled token (class token, or mean of patch tokens) -> ``head``.

    Args:
        num_classes: output logits.
        drop_rate: dropout on the pooled features before ``head`` (drawn from ``rng``).
        **encoder_kwargs: see :class:`~ucfvit.models.encoder.VisionTransformer`.
    """

    def __init__(self, *, num_classes: int = 1000, drop_rate: float = 0.0, **encoder_kwargs):
        encoder_kwargs.setdefault("pos_embed", "sincos" if encoder_kwargs.get("adaptive_patching") else "learned")
        super().__init__(**encoder_kwargs)
        if num_classes <= 0:
            raise ValueError(f"num_classes={num_classes} must be positive")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate={drop_rate} must lie in [0, 1)")
        self.num_classes, self.drop_rate = num_classes, drop_rate
        self.head = nn.Linear(self.embed_dim, num_classes)

    def forward(
        self, x: torch.Tensor, variables: Sequence[str] | None = None, *, rng: RandomSource = None
    ) -> torch.Tensor:
        """(B, C, *img_size), or a PatchSequence if adaptive -> logits (B, num_classes)."""
        tokens = self.forward_features(x, variables, rng=rng)
        pooled = tokens[:, 0] if self.cls_token is not None else masked_mean(tokens, valid_of(x))
        if self.training and self.drop_rate > 0:
            keep = rand(rng, pooled.shape, pooled.device) >= self.drop_rate
            pooled = pooled * keep / (1.0 - self.drop_rate)
        return self.head(pooled)


def _classification_loss(model: ViT, batch, rng: RandomSource, extra) -> torch.Tensor:
    return F.cross_entropy(model(model_input(model, batch), rng=rng).float(), batch["label"])


register_family(FamilySpec("vit", ViT, loss=_classification_loss, recipe={"arch.num_classes": 3}, pooled_head=True))
