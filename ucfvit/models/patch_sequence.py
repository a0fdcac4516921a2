"""Adaptive patching: the :class:`PatchSequence` input that every family takes when it is built with
``adaptive_patching=True``, and everything the families share to use it.

An adaptively patched image (UCF-VIT's quadtree/octree patching, SAP, RoMA's variable-length
token sets) is a sequence of ``L`` square (cubic) regions of varying side, each resized to
``patch_size``, plus where each region lies. A sequence shorter than ``L`` is padded and marked
by ``valid``; pad tokens are never attended to, pooled, kept by MAE masking, counted in a loss or
pasted into a dense output.

What lives here (so that one implementation serves every family):

* :class:`PatchSequence`, :func:`grid_patches` (regular-grid tokenisation), :func:`pad_sequence`.
* :func:`check_sequence`: the input-kind, shape and ``fixed_length`` checks of every family.
* Positions: :func:`sincos_position` (fixed sin-cos of region centre plus of log2 size, SAP's
  embedding) and :class:`AdaptivePosEmbed` (``use_adaptive_pos_emb``: a learned embedding of
  centre and size, as UCF-VIT's ``adaptive_pos_dep_emb``).
* Pad masks: :func:`with_prefix`, :func:`masked_mean`; the mask itself is a (B, N) bool tensor
  passed to every block as the ``valid`` forward argument (see ``ucfvit.models.layers.attention``).
* Token <-> image: :func:`paste` (per-token pixel predictions resized back to their regions),
  :func:`region_owner`/:func:`paint` (token features painted over the patch-grid cells their
  region covers, for UNETR's convolutional decoder), :func:`sequence_target` (patches in
  :func:`~ucfvit.models.patchify.patchify` layout).
* The batch -> sequence rule of the family specs (:func:`batch_sequence`, :func:`model_input`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .embed import sincos_embed

__all__ = [
    "AdaptivePosEmbed",
    "PatchSequence",
    "batch_sequence",
    "check_sequence",
    "grid_patches",
    "is_sequence",
    "masked_mean",
    "model_input",
    "pad_sequence",
    "paint",
    "paste",
    "region_centres",
    "region_owner",
    "sequence_from_tokens",
    "sequence_target",
    "sincos_position",
    "token_layout",
    "with_prefix",
]


class PatchSequence(NamedTuple):
    """An adaptively patched batch: ``L`` regions per sample, each resized to ``patch_size``.

    Attributes:
        patches: (B, L, C, *[patch_size] * ndim) region contents resized to ``patch_size``.
        coords: (B, L, ndim) top-left corners of the regions, in pixels of the original image.
        sizes: (B, L) region sides in pixels (square/cubic regions).
        valid: (B, L) bool, False on pad tokens (sequences shorter than ``L``); None: all valid.
            Pad tokens are ignored but must hold finite values and a positive size (a NaN in a
            masked key still reaches the output through 0 * NaN); :func:`pad_sequence` writes
            zeros and size 1.
    """

    patches: torch.Tensor
    coords: torch.Tensor
    sizes: torch.Tensor
    valid: torch.Tensor | None = None


def is_sequence(x) -> bool:
    return isinstance(x, PatchSequence)


def grid_patches(x: torch.Tensor, patch_size: int) -> PatchSequence:
    """Regular-grid tokenisation of images (B, C, *spatial) as a :class:`PatchSequence`
    (every region of side ``patch_size``, row-major, no padding)."""
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
    return PatchSequence(patches, coords, sizes)


def pad_sequence(seq: PatchSequence, length: int) -> PatchSequence:
    """``seq`` padded with zero pad tokens (``valid`` False) to ``length`` tokens per sample."""
    b, n = seq.patches.shape[:2]
    if length < n:
        raise ValueError(f"cannot pad a sequence of {n} tokens to {length}")
    extra = length - n
    valid = torch.ones(b, n, dtype=torch.bool, device=seq.patches.device) if seq.valid is None else seq.valid
    return PatchSequence(
        torch.cat([seq.patches, seq.patches.new_zeros(b, extra, *seq.patches.shape[2:])], dim=1),
        torch.cat([seq.coords, seq.coords.new_zeros(b, extra, seq.coords.shape[-1])], dim=1),
        torch.cat([seq.sizes, seq.sizes.new_full((b, extra), 1)], dim=1),
        torch.cat([valid, valid.new_zeros(b, extra)], dim=1),
    )


def _describe(x) -> str:
    return f"a tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"


def check_sequence(model: nn.Module, x) -> None:
    """Raise a clear error unless ``x`` is the input kind ``model`` was built for, and (for
    adaptive models) a well-formed :class:`PatchSequence`."""
    name = type(model).__name__
    if not model.adaptive_patching:
        if is_sequence(x):
            raise TypeError(
                f"{name} was built with adaptive_patching=False and takes images (B, C, *img_size), got a "
                "PatchSequence; build it with adaptive_patching=True (and fixed_length=L) for adaptive patches"
            )
        return
    if not is_sequence(x):
        raise TypeError(
            f"{name} was built with adaptive_patching=True and takes a PatchSequence(patches, coords, sizes, valid) "
            f"(e.g. ucfvit.models.grid_patches(image, {model.patch_size}) or a quadtree), got {_describe(x)}"
        )
    patches, coords, sizes, valid = x
    p, nd = model.patch_size, model.ndim
    if patches.ndim != 3 + nd:
        raise ValueError(f"patches must be (B, L, C, *[{p}]*{nd}), got shape {tuple(patches.shape)}")
    if tuple(patches.shape[3:]) != (p,) * nd:
        raise ValueError(f"patches of shape {tuple(patches.shape[3:])} must be resized to patch_size={p}")
    b, length = patches.shape[:2]
    if model.fixed_length is not None and length != model.fixed_length:
        raise ValueError(
            f"got {length} patches per image, the model was built with fixed_length={model.fixed_length}; "
            "pad shorter sequences (pad_sequence) and mark them with valid"
        )
    if tuple(coords.shape) != (b, length, nd) or tuple(sizes.shape) != (b, length):
        raise ValueError(
            f"coords {tuple(coords.shape)} and sizes {tuple(sizes.shape)} must be ({b}, {length}, {nd}) "
            f"and ({b}, {length})"
        )
    if valid is not None:
        if valid.dtype != torch.bool or tuple(valid.shape) != (b, length):
            raise ValueError(
                f"valid must be a bool tensor of shape ({b}, {length}), got {valid.dtype} {tuple(valid.shape)}"
            )
        if not bool(valid.any(dim=1).all()):
            raise ValueError("every sample needs at least one valid token (valid is all False in some row)")


# ---------------------------------------------------------------------------- positions
def region_centres(seq: PatchSequence, patch_size: int) -> torch.Tensor:
    """Region centres (B, L, ndim) in patch units (a grid patch i has centre i + 0.5); RoPE coordinates."""
    return (seq.coords.float() + seq.sizes.unsqueeze(-1).float() / 2) / patch_size


def sincos_position(seq: PatchSequence, patch_size: int, dim: int) -> torch.Tensor:
    """Fixed embedding (B, L, dim): sin-cos of region centres in patch units (a grid patch i at
    position i, as the regular sin-cos table) plus a 1D sin-cos of log2(size / patch_size)."""
    scale = torch.log2(seq.sizes.float() / patch_size).unsqueeze(-1)
    return sincos_embed(region_centres(seq, patch_size) - 0.5, dim) + sincos_embed(scale, dim)


class AdaptivePosEmbed(nn.Module):
    """Learned embedding of each region's position and size (``use_adaptive_pos_emb``): a linear
    map + GELU (UCF-VIT's ``adaptive_pos_dep_emb``) of the centre as a fraction of the image
    side per axis and of log2(size / patch_size)."""

    def __init__(self, ndim: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(ndim + 1, dim)
        self.act = nn.GELU()

    def forward(self, seq: PatchSequence, img_size: Sequence[int], patch_size: int) -> torch.Tensor:
        extent = torch.tensor(img_size, dtype=torch.float32, device=seq.coords.device)
        centres = (seq.coords.float() + seq.sizes.unsqueeze(-1).float() / 2) / extent
        scale = torch.log2(seq.sizes.float() / patch_size).unsqueeze(-1)
        features = torch.cat([centres, scale], dim=-1).to(self.proj.weight.dtype)
        return self.act(self.proj(features))


def positions(model: nn.Module, seq: PatchSequence, dim: int, learned: nn.Module | None) -> torch.Tensor | None:
    """Position embedding (B, L, dim) of a sequence: ``learned`` (an :class:`AdaptivePosEmbed`) if
    given, else the fixed sin-cos one if ``pos_embed='sincos'``, else None."""
    if learned is not None:
        return learned(seq, model.img_size, model.patch_size)
    if model.pos_embed_kind == "sincos":
        return sincos_position(seq, model.patch_size, dim)
    return None


def embed_sequence(model: nn.Module, seq, variables: Sequence[str] | None) -> torch.Tensor:
    """Checked sequence -> patch tokens with positions (B, L, D); used by ``VisionTransformer.embed``."""
    check_sequence(model, seq)
    tokens = model.embed_channels(seq.patches, variables)
    pos = positions(model, seq, tokens.shape[-1], getattr(model, "pos_embed_adaptive", None))
    return tokens if pos is None else tokens + pos.to(tokens.dtype)


def decoder_positions(model: nn.Module, seq: PatchSequence, dim: int) -> torch.Tensor | None:
    return positions(model, seq, dim, getattr(model, "decoder_pos_embed_adaptive", None))


def token_layout(model: nn.Module, x) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(RoPE coordinates (B, N, ndim), valid (B, N) or None) of the patch tokens of an input."""
    if is_sequence(x):
        return region_centres(x, model.patch_size), x.valid
    return model.patch_coords(x.shape[0], x.device), None


# ---------------------------------------------------------------------------- pad masks
def with_prefix(valid: torch.Tensor | None, num_prefix: int) -> torch.Tensor | None:
    """Key mask of patch tokens extended to the prefix (class) tokens, which are always valid."""
    if valid is None or num_prefix == 0:
        return valid
    return F.pad(valid, (num_prefix, 0), value=True)


def masked_mean(tokens: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 1 of (B, N, ...) restricted to valid tokens."""
    if valid is None:
        return tokens.mean(dim=1)
    w = valid.to(tokens.dtype).view(*valid.shape, *([1] * (tokens.ndim - 2)))
    return (tokens * w).sum(dim=1) / w.sum(dim=1)


# ---------------------------------------------------------------------------- tokens <-> image
def _row_major_strides(shape: Sequence[int]) -> list[int]:
    strides = [1] * len(shape)
    for a in range(len(shape) - 2, -1, -1):
        strides[a] = strides[a + 1] * shape[a + 1]
    return strides


def _cube_offsets(side: int, ndim: int, device) -> torch.Tensor:
    return torch.stack(torch.meshgrid(*[torch.arange(side, device=device)] * ndim, indexing="ij"), -1).reshape(-1, ndim)


def paste(
    pred: torch.Tensor,
    coords: torch.Tensor,
    sizes: torch.Tensor,
    img_size: Sequence[int],
    patch_size: int,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token pixel values (B, L, patch_size**ndim * K) in patchify layout -> dense (B, K, *img_size).

    Each token's K x patch_size**ndim values are resized (bi/trilinear) to its region's side and
    written at its corner; pad tokens are skipped. Regions must tile the image without overlap
    (pixels no region covers stay 0).
    """
    b, length = pred.shape[:2]
    nd, p = len(img_size), patch_size
    k = pred.shape[-1] // p**nd
    per_patch = pred.reshape(b * length, *([p] * nd), k).movedim(-1, 1)  # K first for interpolation
    flat_coords, flat_sizes = coords.reshape(-1, nd).long(), sizes.reshape(-1).long()
    keep = None if valid is None else valid.reshape(-1)
    batch_of = torch.arange(b, device=pred.device).repeat_interleave(length)
    strides_t = torch.tensor(_row_major_strides(img_size), device=pred.device)
    pixels = math.prod(img_size)
    out = pred.new_zeros(b * pixels, k)
    mode = "bilinear" if nd == 2 else "trilinear"
    sides = flat_sizes if keep is None else flat_sizes[keep]
    for side in torch.unique(sides).tolist():  # one resize per region size (a few quadtree levels)
        hit = flat_sizes == side
        sel = (hit if keep is None else hit & keep).nonzero().squeeze(1)
        values = F.interpolate(per_patch[sel], size=(side,) * nd, mode=mode, align_corners=False)
        pix = flat_coords[sel].unsqueeze(1) + _cube_offsets(side, nd, pred.device)  # (M, side**nd, nd)
        index = batch_of[sel].unsqueeze(1) * pixels + (pix * strides_t).sum(-1)
        out = out.index_put((index.reshape(-1),), values.flatten(2).transpose(1, 2).reshape(-1, k))
    return out.view(b, *img_size, k).movedim(-1, 1).contiguous()  # a fresh tensor, not a view


def region_owner(seq: PatchSequence, img_size: Sequence[int], patch_size: int) -> torch.Tensor:
    """For every cell of the patch grid, the index of the token whose region covers it: (B, prod(grid)).

    Requires (and checks) that every valid region's corner and side are multiples of
    ``patch_size``, that it lies inside the image, and that the valid regions tile the image:
    each grid cell covered exactly once (a quadtree/octree partition satisfies this).
    """
    p, nd = patch_size, len(img_size)
    grid = [s // p for s in img_size]
    coords, sizes = seq.coords.long(), seq.sizes.long()
    b, length = sizes.shape
    valid = torch.ones_like(sizes, dtype=torch.bool) if seq.valid is None else seq.valid
    bad = ((coords % p != 0).any(-1) | (sizes % p != 0) | (sizes < p)) & valid
    if bool(bad.any()):
        raise ValueError(
            f"painting tokens on the patch grid needs region corners and sides that are multiples of "
            f"patch_size={p}; {int(bad.sum())} region(s) are not aligned"
        )
    cells, sides = coords // p, sizes // p
    limit = torch.tensor(grid, device=coords.device)
    outside = ((cells + sides.unsqueeze(-1)) > limit).any(-1) & valid
    if bool(outside.any()):
        raise ValueError(f"{int(outside.sum())} region(s) reach outside the image of size {tuple(img_size)}")
    cells_total = math.prod(grid)
    flat_cells, flat_sides, flat_valid = cells.reshape(-1, nd), sides.reshape(-1), valid.reshape(-1)
    token_of = torch.arange(length, device=coords.device).repeat(b)
    batch_of = torch.arange(b, device=coords.device).repeat_interleave(length)
    strides_t = torch.tensor(_row_major_strides(grid), device=coords.device)
    owner = torch.zeros(b * cells_total, dtype=torch.long, device=coords.device)
    count = torch.zeros(b * cells_total, dtype=torch.long, device=coords.device)
    for side in torch.unique(flat_sides[flat_valid]).tolist():
        sel = ((flat_sides == side) & flat_valid).nonzero().squeeze(1)
        cell = flat_cells[sel].unsqueeze(1) + _cube_offsets(side, nd, coords.device)
        index = (batch_of[sel].unsqueeze(1) * cells_total + (cell * strides_t).sum(-1)).reshape(-1)
        owner[index] = token_of[sel].repeat_interleave(side**nd)
        count.index_add_(0, index, torch.ones_like(index))
    wrong = int((count != 1).sum())
    if wrong:
        raise ValueError(
            f"the valid regions must tile the image (each patch-grid cell covered once); {wrong} of "
            f"{b * cells_total} cells are covered {'twice or more' if bool((count > 1).any()) else 'by no region'}"
        )
    return owner.view(b, cells_total)


def paint(tokens: torch.Tensor, owner: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Token features (B, L, D) -> dense grid (B, D, *grid): every cell takes the features of the
    token that covers it (:func:`region_owner`). Gradients flow back to the tokens."""
    b, _, d = tokens.shape
    cells = tokens.gather(1, owner.unsqueeze(-1).expand(-1, -1, d))  # (B, G, D)
    return cells.transpose(1, 2).reshape(b, d, *grid)


def sequence_target(seq: PatchSequence) -> torch.Tensor:
    """Patches (B, L, C, *p) in :func:`~ucfvit.models.patchify.patchify` layout: (B, L, p**ndim * C)."""
    return seq.patches.movedim(2, -1).flatten(2)


def sequence_from_tokens(pred: torch.Tensor, channels: int, patch_size: int, ndim: int) -> torch.Tensor:
    """Inverse of :func:`sequence_target` on predictions: (B, L, p**ndim * C) -> (B, L, C, *p)."""
    return pred.unflatten(-1, (*([patch_size] * ndim), channels)).movedim(-1, 2).contiguous()


# ---------------------------------------------------------------------------- batches
def batch_sequence(model: nn.Module, batch) -> PatchSequence:
    """The patch sequence of a batch: its ``patches``/``coords``/``sizes`` (and ``valid``) entries
    if present (a data pipeline's quadtree), else a regular grid of ``batch["image"]``."""
    if "patches" in batch:
        return PatchSequence(batch["patches"], batch["coords"], batch["sizes"], batch.get("valid"))
    return grid_patches(batch["image"], model.patch_size)


def model_input(model: nn.Module, batch):
    """What a family's forward takes from a batch: the image, or a PatchSequence for adaptive models."""
    return batch_sequence(model, batch) if getattr(model, "adaptive_patching", False) else batch["image"]
