"""Transformer layers shared by every ucfvit model: attention, MLP, layer scale, block, drop path.

Attention uses separate ``q``/``k``/``v`` projections and reshapes with ``-1`` heads, so a
tensor-parallel plan can shard them column-wise and the same code runs with the local heads of
a rank (see ``ucfvit.parallel.plans``).

Randomness (dropout, drop path) never happens inside these modules: the model draws it from its
``rng`` outside the blocks and passes it in as multiplicative *scales* (``keep / (1 - rate)``,
or zero). A scale that covers a dimension a tensor-parallel rank holds only a slice of (the
heads of ``prob_scale``, the hidden features of ``hidden_scale``) is drawn at its global size;
the module keeps the slice it computes, starting at ``head_offset`` / ``hidden_offset``. These
offsets are 0 in one process; under tensor parallelism the plan passes them in as data
(``ucfvit.parallel.plans.ShardOffset``), so the model never needs to know its rank and every
rank applies exactly the mask of the single-process run.
"""

from __future__ import annotations

import math
import typing
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .init import KeyedInit

AttnBackend = Literal["sdpa", "xformers", "math"]
ATTN_BACKENDS: tuple[str, ...] = typing.get_args(AttnBackend)

__all__ = ["ATTN_BACKENDS", "attention", "Attention", "Mlp", "LayerScale", "Block", "drop_path", "apply_rotary"]


def _check_backend(backend: str) -> None:
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend={backend!r} is unknown; choose one of {ATTN_BACKENDS}")
    if backend == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except ImportError as err:
            raise ValueError(
                "attn_backend='xformers' needs the xformers package: pip install 'ucfvit[xformers]' "
                "(CUDA only), or use attn_backend='sdpa'"
            ) from err


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str = "sdpa",
    valid: torch.Tensor | None = None,
    prob_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of ``q, k, v`` shaped (B, heads, N, head_dim) -> (B, heads, N, head_dim).

    ``valid`` (B, M) bool marks the keys that may be attended to (False: pad tokens); None: all.
    ``prob_scale`` (B, heads, N, M) multiplies the attention probabilities (attention dropout);
    it needs the probabilities, so attention is then computed explicitly whatever the backend.
    """
    if prob_scale is not None:
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        if valid is not None:
            scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        return (scores.softmax(dim=-1) * prob_scale.to(q.dtype)) @ v
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if valid is None else valid[:, None, None, :])
    if backend == "math":
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        if valid is not None:
            scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        return scores.softmax(dim=-1) @ v
    if backend == "xformers":
        import xformers.ops as xops

        bias = None
        if valid is not None:  # additive bias (B, heads, N, M), allocated with M padded to 8 as xformers wants
            b, h, n, m = *q.shape[:3], k.shape[2]
            bias = q.new_zeros(b, h, n, (m + 7) // 8 * 8)[..., :m]
            bias.masked_fill_(~valid[:, None, None, :], float("-inf"))
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
        return out.transpose(1, 2)
    raise ValueError(f"attn_backend={backend!r} is unknown; choose one of {ATTN_BACKENDS}")


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate pairs of channels of ``x`` (B, heads, N, head_dim) by angles given as (cos, sin).

    ``cos``/``sin`` are (B, 1, N, head_dim) with each angle repeated for the two channels of a
    pair; channels that carry no position have cos=1, sin=0.
    """
    cos, sin = rope[0].to(x.dtype), rope[1].to(x.dtype)
    x_pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-x_pairs[..., 1], x_pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos + rotated * sin


def _local(scale: torch.Tensor | None, dim: int, offset: int, size: int) -> torch.Tensor | None:
    """The slice ``offset:offset+size`` along ``dim`` of a globally drawn scale (see module doc)."""
    if scale is None or (offset == 0 and scale.shape[dim] == size):
        return scale
    return scale.narrow(dim, offset, size)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections (self- or cross-attention).

    The head count is never stored: the projections' output size fixes it, so the module works
    unchanged when a tensor-parallel plan leaves a rank with a slice of the heads.
    ``qk_norm`` adds a LayerNorm over ``head_dim`` on q and k of every head (``q_norm``, ``k_norm``;
    the latter without bias, which softmax would cancel).
    """

    def __init__(
        self, dim: int, num_heads: int, *, qkv_bias: bool = True, qk_norm: bool = False, backend: str = "sdpa"
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim={dim} must be divisible by num_heads={num_heads}")
        _check_backend(backend)
        self.head_dim = dim // num_heads
        self.backend = backend
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        # No key bias: it adds q.b_k to every score of a query, which softmax cancels, so it would
        # have no effect on the output and an exactly zero gradient (pure noise under Adam).
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        # No k_norm bias either: it adds q.b to every score of a query, which softmax cancels.
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6, bias=False) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        valid: torch.Tensor | None = None,
        prob_scale: torch.Tensor | None = None,
        head_offset: int = 0,
    ) -> torch.Tensor:
        """Attend from ``x`` (B, N, D) to ``context`` (B, M, D), or to ``x`` itself.

        ``valid`` (B, M) bool excludes pad keys (see :func:`attention`). ``prob_scale`` (B, H, N, M)
        scales the probabilities of all H heads (attention dropout); this module computes heads
        ``head_offset:head_offset + local heads`` of them.
        """
        kv = x if context is None else context
        b, n = x.shape[:2]
        # q/k norms act on (B, N, h, hd) before the transpose: the same values as timm's norm of
        # (B, h, N, hd), on the contiguous projection output.
        q = self.q_norm(self.q(x).view(b, n, -1, self.head_dim)).transpose(1, 2)  # (B, h, N, hd)
        k = self.k_norm(self.k(kv).view(b, kv.shape[1], -1, self.head_dim)).transpose(1, 2)
        v = self.v(kv).view(b, kv.shape[1], -1, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        out = attention(q, k, v, self.backend, valid, _local(prob_scale, 1, head_offset, q.shape[1]))  # (B, h, N, hd)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    """Two-layer GELU MLP (``fc1`` -> GELU -> ``fc2``)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(
        self, x: torch.Tensor, hidden_scale: torch.Tensor | None = None, hidden_offset: int = 0
    ) -> torch.Tensor:
        """``hidden_scale`` (B, N, hidden) multiplies the activations (dropout); this module computes
        hidden features ``hidden_offset:hidden_offset + local features`` of them."""
        h = self.act(self.fc1(x))
        scale = _local(hidden_scale, -1, hidden_offset, h.shape[-1])
        return self.fc2(h if scale is None else h * scale.to(h.dtype))


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (CaiT; timm's ``ls1``/``ls2``), ``gamma`` init ``init_values``."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.empty(dim))

    def reset_parameters(self, init: KeyedInit | None = None) -> None:
        (init or KeyedInit(self)).constant_(self.gamma, self.init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def drop_path(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Multiply a residual branch by its noise: ``scale`` (B,) per sample (stochastic depth,
    keep/keep_prob) or shaped like ``x`` per element (dropout, possibly times stochastic depth)."""
    if scale is None:
        return x
    if scale.ndim == 1:
        scale = scale.view(-1, *([1] * (x.ndim - 1)))
    return x * scale.to(x.dtype)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``.

    Randomness is an input, drawn by the model outside the block, so activation checkpointing and
    compile can replay the block exactly: ``drop_scale`` (2, B) or (2, B, N, D) multiplies the
    two branch outputs (drop path, dropout after ``attn.proj`` / ``mlp.fc2``), ``prob_scale``
    the attention probabilities and ``hidden_scale`` the MLP activations (see module doc). So is
    the pad mask (``valid`` (B, N) bool, None: no padding), so it reaches attention unchanged under
    tensor/sequence parallelism, checkpointing and compile.
    ``init_values`` turns on LayerScale (``ls1``, ``ls2``); otherwise they are identities.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        init_values: float | None = None,
        backend: str = "sdpa",
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, backend=backend)
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        drop_scale: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        prob_scale: torch.Tensor | None = None,
        hidden_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        s_attn, s_mlp = (None, None) if drop_scale is None else (drop_scale[0], drop_scale[1])
        x = x + drop_path(self.ls1(self.attn(self.norm1(x), rope=rope, valid=valid, prob_scale=prob_scale)), s_attn)
        x = x + drop_path(self.ls2(self.mlp(self.norm2(x), hidden_scale=hidden_scale)), s_mlp)
        return x
