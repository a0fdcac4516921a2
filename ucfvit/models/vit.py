"""ViT for classification (Dosovitskiy et al., 2021), 2D or 3D."""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import PosEmbed, VisionTransformer, dropout_scale, shuffle_indices
from .patch_sequence import masked_mean, model_input, token_layout
from .ranges import AT_LEAST_1, FRACTION, Range
from .registry import FamilySpec, register_family
from .rng import RandomSource
from .tasks import Classification

__all__ = ["GLOBAL_POOLS", "ViT"]

GlobalPool = Literal["token", "avg"]
GLOBAL_POOLS: tuple[str, ...] = typing.get_args(GlobalPool)


class ViT(VisionTransformer):
    """Image classifier: encoder -> pooled features -> ``fc_norm`` -> dropout -> ``head``.

    Pooling and norms follow timm's ``VisionTransformer``: ``"token"`` takes the class token,
    ``"avg"`` the mean of the patch tokens (prefix tokens excluded). With ``fc_norm`` the final
    ``norm`` is an identity and the pooled vector is normalised instead (timm: avg pooling, the
    MAE fine-tuning setup); without it every token is normalised by ``norm`` before pooling.

    Args:
        num_classes: output logits.
        global_pool: ``"token"`` or ``"avg"``; default ``"token"`` with a class token, else ``"avg"``.
        fc_norm: normalise the pooled features (``fc_norm``) instead of the tokens (``norm``);
            default (None): True for ``"avg"``, False for ``"token"``, as timm.
        drop_rate: dropout on the pooled features before ``head`` (drawn from ``rng``).
        patch_drop_rate: in training, keep a random ``max(1, int(N * (1 - rate)))`` of the patch
            tokens (prefix tokens always kept) before the blocks (timm's PatchDropout); grid input only.
        pos_embed: as the encoder's; default (None): ``"learned"``, or ``"sincos"`` with
            ``adaptive_patching`` (a learned table needs grid positions).
        **encoder_kwargs: see :class:`~ucfvit.models.encoder.VisionTransformer`.
    """

    OPTION_RANGES: ClassVar[dict[str, Range]] = {
        "num_classes": AT_LEAST_1,
        "drop_rate": FRACTION,
        "patch_drop_rate": FRACTION,
    }

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        global_pool: GlobalPool | None = None,
        fc_norm: bool | None = None,
        drop_rate: float = 0.0,
        patch_drop_rate: float = 0.0,
        pos_embed: PosEmbed | None = None,
        **encoder_kwargs,
    ):
        if pos_embed is None:
            pos_embed = "sincos" if encoder_kwargs.get("adaptive_patching") else "learned"
        encoder_kwargs["pos_embed"] = pos_embed
        if patch_drop_rate and encoder_kwargs.get("adaptive_patching"):
            raise ValueError(
                "patch_drop_rate applies to images on the regular patch grid; with adaptive_patching choose the "
                "number of patches with fixed_length instead"
            )
        super().__init__(**encoder_kwargs)
        if num_classes <= 0:
            raise ValueError(f"num_classes={num_classes} must be positive")
        for name, rate in (("drop_rate", drop_rate), ("patch_drop_rate", patch_drop_rate)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name}={rate} must lie in [0, 1)")
        if global_pool is None:
            global_pool = "token" if self.cls_token is not None else "avg"
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool={global_pool!r} is unknown; choose one of {GLOBAL_POOLS}")
        if global_pool == "token" and self.cls_token is None:
            raise ValueError("global_pool='token' needs class_token=True; or use global_pool='avg'")
        self.global_pool = global_pool
        self.use_fc_norm = global_pool == "avg" if fc_norm is None else bool(fc_norm)
        if self.use_fc_norm:
            self.norm = nn.Identity()
        self.fc_norm = nn.LayerNorm(self.embed_dim, eps=1e-6) if self.use_fc_norm else nn.Identity()
        self.num_classes, self.drop_rate, self.patch_drop_rate = num_classes, drop_rate, patch_drop_rate
        self.head = nn.Linear(self.embed_dim, num_classes)

    def patch_dropout(
        self, tokens: torch.Tensor, coords: torch.Tensor, rng: RandomSource
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """In training, a random subset of the patch tokens (B, K, D) and their coordinates."""
        if not self.training or self.patch_drop_rate == 0:
            return tokens, coords
        b, n, d = tokens.shape
        keep = shuffle_indices(rng, b, n, tokens.device)[:, : max(1, int(n * (1 - self.patch_drop_rate)))]
        return tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, d)), coords.gather(
            1, keep.unsqueeze(-1).expand(-1, -1, coords.shape[-1])
        )

    def pool(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output (B, P+N, D) -> pooled features (B, D), normalised by ``fc_norm`` if on;
        ``avg`` averages the valid patch tokens (``valid`` (B, N) bool, None: all)."""
        if self.global_pool == "token":
            return self.fc_norm(tokens[:, 0])
        return self.fc_norm(masked_mean(tokens[:, self.num_prefix_tokens :], valid))

    def forward(
        self, x: torch.Tensor, variables: Sequence[str] | None = None, *, rng: RandomSource = None
    ) -> torch.Tensor:
        """(B, C, *img_size), or a PatchSequence if adaptive -> logits (B, num_classes)."""
        tokens = self.embed(x, variables)
        coords, valid = token_layout(self, x)
        tokens, coords = self.patch_dropout(tokens, coords, rng)
        pooled = self.pool(self.encode(tokens, coords, rng, valid=valid)[0], valid)
        if self.training and self.drop_rate > 0:
            pooled = pooled * dropout_scale(rng, pooled.shape, self.drop_rate, pooled.device).to(pooled.dtype)
        return self.head(pooled)


def _classification_loss(model: ViT, batch, rng: RandomSource, extra) -> torch.Tensor:
    logits = model(model_input(model, batch), variables=batch.get("variables"), rng=rng)
    return F.cross_entropy(logits.float(), batch["label"])


register_family(
    FamilySpec(
        "vit",
        ViT,
        loss=_classification_loss,
        recipe={"arch.num_classes": 3},
        pooled_head=True,
        needs=("label",),
        evaluation=Classification(),
    )
)
