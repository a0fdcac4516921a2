"""Token embeddings: patch embedding (2D/3D, per-variable, adaptive), position embeddings
(sin-cos, learned, rotary) and variable aggregation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .init import KeyedInit
from .layers import Attention

__all__ = [
    "PatchEmbed",
    "VariablePatchEmbed",
    "AdaptivePatchEmbed",
    "VariableAggregation",
    "sincos_embed",
    "grid_coords",
    "rope_angles",
    "timestep_embed",
    "resize_pos_embed",
]


def _conv(ndim: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    return nn.Conv2d if ndim == 2 else nn.Conv3d


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens with a strided convolution: (B, C, *S) -> (B, N, D)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, ndim: int):
        super().__init__()
        self.proj = _conv(ndim)(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VariablePatchEmbed(nn.Module):
    """One patch embedding per declared variable (ClimaX-style variable tokenisation).

    ``forward(x, var_idx)`` embeds channel ``i`` of ``x`` with the weights of variable
    ``var_idx[i]``: (B, C, *S) -> (B, C, N, D). All channels run as one grouped convolution.
    """

    def __init__(self, num_vars: int, patch_size: int, embed_dim: int, ndim: int):
        super().__init__()
        self.ndim = ndim
        self.weight = nn.Parameter(torch.empty(num_vars, embed_dim, 1, *([patch_size] * ndim)))
        self.bias = nn.Parameter(torch.empty(num_vars, embed_dim))
        self.stride = patch_size

    def reset_parameters(self, init: KeyedInit | None = None) -> None:
        """Each variable's kernel Xavier-uniform like a linear layer over its flattened patch, zero
        biases; drawn from ``init`` (default: keyed by ``torch.initial_seed()`` and this module's names)."""
        init = init or KeyedInit(self)
        fan_in = math.prod(self.weight.shape[2:])
        bound = math.sqrt(6.0 / (fan_in + self.weight.shape[1]))
        init.uniform_(self.weight, -bound, bound)
        init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, var_idx: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        weight = self.weight[var_idx].flatten(0, 1)  # (C*D, 1, *p)
        conv = F.conv2d if self.ndim == 2 else F.conv3d
        out = conv(x, weight, self.bias[var_idx].flatten(), stride=self.stride, groups=c)
        return out.view(b, c, self.weight.shape[1], -1).transpose(2, 3)  # (B, C, N, D)


class AdaptivePatchEmbed(nn.Module):
    """Embeds pre-tokenised adaptive patches (each region resized to ``patch_size``).

    Input (B, L, C, *[patch_size] * ndim) -> (B, L, D). Equivalent to :class:`PatchEmbed`
    applied to every resized patch.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, ndim: int):
        super().__init__()
        self.proj = nn.Linear(in_chans * patch_size**ndim, embed_dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches.flatten(2))


class VariableAggregation(nn.Module):
    """Merges per-variable tokens (B, V, N, D) into one token per patch (B, N, D) by
    cross-attention from a learned query (as in ClimaX / UCF-VIT)."""

    def __init__(self, dim: int, num_heads: int, backend: str = "sdpa"):
        super().__init__()
        self.query = nn.Parameter(torch.empty(1, 1, dim))
        self.attn = Attention(dim, num_heads, backend=backend)

    def reset_parameters(self, init: KeyedInit | None = None) -> None:
        """The query N(0, 0.02**2), drawn from ``init`` (default: keyed by ``torch.initial_seed()``
        and this module's names; the attention's linears are the model's, see ``init_weights``)."""
        (init or KeyedInit(self)).normal_(self.query, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, v, n, d = tokens.shape
        context = tokens.permute(0, 2, 1, 3).reshape(b * n, v, d)
        out = self.attn(self.query.expand(b * n, -1, -1), context=context)  # (B*N, 1, D)
        return out.view(b, n, d)


def grid_coords(grid: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Integer patch coordinates of a row-major grid: (prod(grid), ndim) float."""
    axes = [torch.arange(g, dtype=torch.float32, device=device) for g in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))


def _axis_frequencies(num: int, theta: float, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(num, dtype=dtype, device=device) / max(num, 1))


def sincos_embed(coords: torch.Tensor, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Sin-cos embedding of (possibly fractional) coordinates (..., ndim) -> (..., dim).

    Each axis gets ``2 * (dim // (2 * ndim))`` channels, ``[sin(c * w_i)..., cos(c * w_i)...]`` with
    ``w_i = 1 / theta**(i / (dim // (2 * ndim)))``; leftover channels are zero. Axis order of the
    channel blocks follows the references: 1D is the Transformer's embedding; 2D puts the second
    coordinate (column, w) first and the row second, as MAE's ``get_2d_sincos_pos_embed``; 3D keeps
    (axis 0, 1, 2) = (h, w, d), as UCF-VIT's ``get_3d_sincos_pos_embed``. Computed in the dtype of
    ``coords`` when it is float64 (exact tables), else in float32; returns float32.
    """
    ndim = coords.shape[-1]
    per_axis = dim // (2 * ndim)
    dtype = torch.float64 if coords.dtype == torch.float64 else torch.float32
    freqs = _axis_frequencies(per_axis, theta, coords.device, dtype)
    axes = (1, 0) if ndim == 2 else range(ndim)
    parts = []
    for a in axes:
        angles = coords[..., a : a + 1].to(dtype) * freqs  # (..., per_axis)
        parts += [angles.sin(), angles.cos()]
    out = torch.cat(parts, dim=-1).float()
    return F.pad(out, (0, dim - out.shape[-1]))


def resize_pos_embed(
    table: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int], num_prefix: int = 0
) -> torch.Tensor:
    """Resample a learned position table (1, P + prod(old_grid), D) to (1, P + prod(new_grid), D).

    The patch rows are interpolated bilinearly (2D) or trilinearly (3D) over the row-major grid
    (``align_corners=False``); the ``num_prefix`` leading rows (class-token slots) are kept as they are.
    """
    old_grid, new_grid = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
    if len(old_grid) != len(new_grid) or len(old_grid) not in (2, 3):
        raise ValueError(f"old_grid={old_grid} and new_grid={new_grid} must both be 2D or both 3D")
    if table.ndim != 3 or table.shape[1] != num_prefix + math.prod(old_grid):
        raise ValueError(
            f"table of shape {tuple(table.shape)} does not hold num_prefix={num_prefix} + prod(old_grid={old_grid}) "
            "rows; pass the grid the table was trained with"
        )
    prefix, patches = table[:, :num_prefix], table[:, num_prefix:]
    if old_grid == new_grid:
        return table
    d = table.shape[-1]
    grid = patches.reshape(1, *old_grid, d).movedim(-1, 1).float()  # (1, D, *old_grid)
    mode = "bilinear" if len(old_grid) == 2 else "trilinear"
    resized = F.interpolate(grid, size=new_grid, mode=mode, align_corners=False)
    resized = resized.movedim(1, -1).reshape(1, -1, d).to(table.dtype)
    return torch.cat([prefix, resized], dim=1)


def rope_angles(coords: torch.Tensor, head_dim: int, theta: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary (cos, sin) for coordinates (B, N, ndim) -> two (B, 1, N, head_dim) tensors.

    Each axis rotates ``head_dim // (2 * ndim)`` channel pairs; leftover channels are unrotated.
    """
    ndim = coords.shape[-1]
    per_axis = head_dim // (2 * ndim)
    freqs = _axis_frequencies(per_axis, theta, coords.device)
    angles = torch.cat([coords[..., a : a + 1].float() * freqs for a in range(ndim)], dim=-1)
    angles = F.pad(angles, (0, head_dim // 2 - angles.shape[-1]))  # zero angle: no rotation
    angles = angles.repeat_interleave(2, dim=-1).unsqueeze(1)  # (B, 1, N, head_dim)
    return angles.cos(), angles.sin()


def timestep_embed(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of diffusion timesteps (B,) -> (B, dim)."""
    return sincos_embed(t.float().unsqueeze(-1), dim, theta=max_period)
