"""The ViT encoder that every ucfvit family shares, and the token decoder of MAE/DiffusionViT/SAP.

Families subclass :class:`VisionTransformer` (and :class:`EncoderDecoder` when they decode
tokens with a transformer), so every model has the same module names: ``patch_embed``,
``pos_embed``, ``cls_token``, ``blocks.N.{norm1,attn.{q,k,v,proj},norm2,mlp.{fc1,fc2}}``,
``norm``, and ``decoder_embed``, ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``.
One tensor-parallel plan and one weight import then work by name for every family.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from torch import nn

from .embed import (
    AdaptivePatchEmbed,
    PatchEmbed,
    VariableAggregation,
    VariablePatchEmbed,
    grid_coords,
    resize_pos_embed,
    rope_angles,
    sincos_embed,
)
from .init import KeyedInit
from .layers import Attention, AttnBackend, Block
from .patch_sequence import AdaptivePosEmbed, embed_sequence, is_sequence, token_layout, with_prefix
from .patchify import check_patch_grid, to_ntuple
from .ranges import AT_LEAST_0, AT_LEAST_1, FRACTION, POSITIVE, Range
from .rng import RandomSource, rand

PosEmbed = Literal["sincos", "learned", "learned_sincos", "none"]
POS_EMBEDS: tuple[str, ...] = typing.get_args(PosEmbed)
LEARNED_POS_EMBEDS = ("learned", "learned_sincos")

__all__ = ["POS_EMBEDS", "EncoderDecoder", "VisionTransformer", "dropout_scale", "shuffle_indices"]

# Parameters without weight decay besides every 1-D parameter and every bias: tokens and embeddings.
_NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed", "var_embed", "query")


def _init_linear_like(
    init: KeyedInit, weight: torch.Tensor, bias: torch.Tensor | None, fan_out: int | None = None
) -> None:
    """Xavier-uniform over (out, prod(rest)), as the MAE reference initialises linears and the
    patch projection; ``fan_out`` overrides the output fan (q/k/v: that of the fused (3D, D) qkv).
    Computed from the global shape, so it is valid on sharded DTensors."""
    fan_in = math.prod(weight.shape[1:])
    fan_out = weight.shape[0] if fan_out is None else fan_out
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    init.uniform_(weight, -bound, bound)
    if bias is not None:
        init.zeros_(bias)


def dropout_scale(rng: RandomSource, shape: Sequence[int], rate: float, device: torch.device) -> torch.Tensor:
    """Dropout as a multiplicative scale drawn from ``rng``: ``keep / (1 - rate)``, batch first."""
    return (rand(rng, shape, device) >= rate).float() / (1.0 - rate)


def shuffle_indices(rng: RandomSource, batch: int, num: int, device: torch.device) -> torch.Tensor:
    """A random permutation of ``num`` token indices per sample (B, num), drawn from ``rng``.

    Sorting is stable, so the rare ties of 24-bit uniforms break by index on every device and batch split."""
    return rand(rng, (batch, num), device).argsort(dim=1, stable=True)


def _check_block_shape(dim: int, heads: int, mlp_ratio: float, rope: bool, prefix: str) -> None:
    """Shapes the blocks cannot run with although each option is valid alone (``prefix``: ``decoder_``)."""
    if not dim * mlp_ratio >= 1:  # also NaN
        raise ValueError(
            f"{prefix}mlp_ratio={mlp_ratio} leaves the MLP no hidden feature at {prefix}embed_dim={dim}: "
            f"{prefix}embed_dim * {prefix}mlp_ratio must be at least 1"
        )
    if rope and (dim // heads) % 2:
        raise ValueError(
            f"rope=True rotates channel pairs, so the head width {prefix}embed_dim / {prefix}num_heads = "
            f"{dim} / {heads} = {dim // heads} must be even"
        )


class VisionTransformer(nn.Module):
    """ViT encoder: embed patches (2D or 3D), add positions, run ``depth`` blocks, normalise.

    Args:
        img_size: image size, an int (with ``ndim``) or a 2/3-tuple. Ignored shapes for adaptive patching.
        patch_size: side of a square/cubic patch; ``img_size`` must be divisible by it.
        in_chans: input channels (standard mode).
        ndim: 2 or 3 when ``img_size`` is an int.
        embed_dim: token width of the encoder.
        depth: encoder blocks.
        num_heads: attention heads per encoder block (must be divisible by the mesh's tp).
        mlp_ratio: MLP width of the blocks relative to ``embed_dim``.
        qkv_bias: biases on the q and v projections (k has none: softmax cancels it).
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        attn_drop_rate: dropout on the attention probabilities of the encoder blocks.
        proj_drop_rate: dropout after ``attn.proj``, after the MLP activation and after ``mlp.fc2``
            of the encoder blocks (timm's ``proj_drop``).
        pos_drop_rate: dropout on the tokens (prefix included) after positions are added.
        qk_norm: LayerNorm over ``head_dim`` on q and k in the encoder blocks (timm's ``qk_norm``).
        init_values: LayerScale initial value of the encoder blocks (``ls1``/``ls2``); None: off.
        class_token: prepend a learned class token.
        pos_embed: ``"sincos"`` (fixed buffer), ``"learned"`` (trunc-normal init),
            ``"learned_sincos"`` (learned, initialised with the sin-cos table: UCF-VIT's ``learn``)
            or ``"none"``. Learned tables hold patch rows only (no class-token row) and are resized
            (bi/trilinear) by ``load_state_dict`` when a checkpoint's grid differs. Adaptive input
            (SAP always) takes ``"sincos"`` or ``"none"``; default ``"sincos"`` (ViT: ``"learned"``).
        rope: rotary position embedding over the 2D/3D patch coordinates in every block.
        attn_backend: ``"sdpa"``, ``"xformers"`` or ``"math"``.
        variables: names of the input channels the model knows (UCF-VIT's ``default_vars``).
        use_varemb: tokenise each channel separately and merge by variable aggregation.
        single_channel: batches hold one variable at a time (1 channel + its variable embedding).
        adaptive_patching: input is a :class:`~ucfvit.models.patch_sequence.PatchSequence` of variable-size
            regions resized to ``patch_size`` (e.g. a quadtree), not an image.
        fixed_length: tokens per sample ``L`` of adaptive input (checked in forward; shorter
            sequences are padded and marked by ``valid``). Sets ``num_patches``.
        use_adaptive_pos_emb: with adaptive_patching, a learned embedding of each region's
            position and size instead of the fixed sin-cos of centre and log-size.
    """

    OPTION_RANGES: ClassVar[dict[str, Range]] = {
        "img_size": AT_LEAST_1,  # per entry
        "patch_size": AT_LEAST_1,
        "in_chans": AT_LEAST_1,
        "embed_dim": AT_LEAST_1,
        "depth": AT_LEAST_1,
        "num_heads": AT_LEAST_1,
        "mlp_ratio": POSITIVE,
        "drop_path_rate": FRACTION,
        "attn_drop_rate": FRACTION,
        "proj_drop_rate": FRACTION,
        "pos_drop_rate": FRACTION,
        # 0 is meaningful: residual branches start switched off and their scale learns (ReZero).
        "init_values": AT_LEAST_0,
        "fixed_length": AT_LEAST_1,
    }
    """The allowed range of each numeric constructor option (see :mod:`ucfvit.models.ranges`)."""

    def __init__(
        self,
        *,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        ndim: int = 2,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        qk_norm: bool = False,
        init_values: float | None = None,
        class_token: bool = True,
        pos_embed: PosEmbed = "sincos",
        rope: bool = False,
        attn_backend: AttnBackend = "sdpa",
        variables: Sequence[str] | None = None,
        use_varemb: bool = False,
        single_channel: bool = False,
        adaptive_patching: bool = False,
        fixed_length: int | None = None,
        use_adaptive_pos_emb: bool = False,
    ):
        super().__init__()
        if ndim not in (2, 3) and isinstance(img_size, int):
            raise ValueError(f"ndim={ndim} must be 2 or 3")
        self.img_size = to_ntuple(img_size, ndim if isinstance(img_size, int) else len(img_size), "img_size")
        self.ndim = len(self.img_size)
        self.patch_size = int(patch_size)
        self.grid = check_patch_grid(self.img_size, self.patch_size)
        self.num_patches = math.prod(self.grid)
        self.fixed_length, self.use_adaptive_pos_emb = fixed_length, use_adaptive_pos_emb
        if fixed_length is not None and (fixed_length <= 0 or not adaptive_patching):
            raise ValueError(f"fixed_length={fixed_length} must be positive and needs adaptive_patching=True")
        if use_adaptive_pos_emb and not adaptive_patching:
            raise ValueError(
                "use_adaptive_pos_emb=True embeds adaptive patch positions: it needs adaptive_patching=True"
            )
        if fixed_length is not None:
            self.num_patches = fixed_length  # tokens per sample: what FLOP and token counts use
        for name, value in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)):
            if value <= 0:
                raise ValueError(f"{name}={value} must be positive")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        _check_block_shape(embed_dim, num_heads, mlp_ratio, rope, "")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed={pos_embed!r} is unknown; choose one of {POS_EMBEDS}")
        rates = {"drop_path_rate": drop_path_rate, "attn_drop_rate": attn_drop_rate}
        rates.update(proj_drop_rate=proj_drop_rate, pos_drop_rate=pos_drop_rate)
        for name, rate in rates.items():
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name}={rate} must lie in [0, 1)")
        if use_varemb and single_channel:
            raise ValueError("use_varemb and single_channel are exclusive: pick one way of embedding variables")
        if adaptive_patching and pos_embed in LEARNED_POS_EMBEDS:
            raise ValueError(
                f"adaptive_patching does not support pos_embed={pos_embed!r}: a learned table has one row per grid "
                "patch, adaptive patches have continuous positions and sizes; use pos_embed='sincos' (fixed), "
                "use_adaptive_pos_emb=True (learned) or rope=True"
            )
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.drop_path_rate, self.attn_drop_rate, self.proj_drop_rate = drop_path_rate, attn_drop_rate, proj_drop_rate
        self.pos_drop_rate = pos_drop_rate
        self.rope = rope
        self.use_varemb, self.single_channel, self.adaptive_patching = use_varemb, single_channel, adaptive_patching
        self.pos_embed_kind = pos_embed
        if variables is None:
            variables = tuple(f"channel{i}" for i in range(in_chans))
        self.variables = tuple(variables)
        if len(set(self.variables)) != len(self.variables):
            raise ValueError(f"variables={self.variables} contains duplicates")
        if not (use_varemb or single_channel) and len(self.variables) != in_chans:
            raise ValueError(f"variables={self.variables} must name in_chans={in_chans} channels")
        self.in_chans = 1 if single_channel else in_chans
        # Channels of an output in image space: one per declared variable with variable embedding.
        self.data_chans = len(self.variables) if use_varemb else self.in_chans
        self.num_prefix_tokens = int(class_token)

        if use_varemb:
            self.patch_embed = VariablePatchEmbed(len(self.variables), self.patch_size, embed_dim, self.ndim)
            self.var_agg = VariableAggregation(embed_dim, num_heads, backend=attn_backend)
        elif adaptive_patching:
            self.patch_embed = AdaptivePatchEmbed(self.patch_size, self.in_chans, embed_dim, self.ndim)
        else:
            self.patch_embed = PatchEmbed(self.patch_size, self.in_chans, embed_dim, self.ndim)
        if use_varemb or single_channel:
            self.var_embed = nn.Parameter(torch.empty(len(self.variables), embed_dim))
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim)) if class_token else None
        self._add_pos_embed("pos_embed", embed_dim)
        if use_adaptive_pos_emb:
            self.pos_embed_adaptive = AdaptivePosEmbed(self.ndim, embed_dim)
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                qk_norm=qk_norm,
                init_values=init_values,
                backend=attn_backend,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    # ------------------------------------------------------------------ initialisation
    def _sincos_table(self, dim: int) -> torch.Tensor:
        # float64 coordinates: the table equals the float64 reference formulas rounded to float32.
        return sincos_embed(grid_coords(self.grid).double(), dim).unsqueeze(0)  # (1, N, dim)

    def _add_pos_embed(self, name: str, dim: int) -> None:
        """Register position table ``name`` of width ``dim``: a learned parameter, a fixed sin-cos
        buffer (not saved: it is recomputed), or None (no table, or continuous adaptive positions)."""
        if self.pos_embed_kind in LEARNED_POS_EMBEDS:
            setattr(self, name, nn.Parameter(torch.empty(1, self.num_patches, dim)))
        elif self.pos_embed_kind == "sincos" and not self.adaptive_patching:
            self.register_buffer(name, self._sincos_table(dim), persistent=False)
        else:
            setattr(self, name, None)

    def _init_pos_embed(self, init: KeyedInit, name: str) -> None:
        table = getattr(self, name)
        if self.pos_embed_kind == "learned":
            init.trunc_normal_(table, std=0.02)
        elif table is not None:
            init.copy_(table, self._sincos_table(table.shape[-1]))

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialise every parameter and buffer, the same on any mesh: each random value is
        keyed by (``seed``, the tensor's name, its global element index) (see
        :mod:`ucfvit.models.init`); ``seed`` defaults to the one of the last ``torch.manual_seed``.
        Valid on the meta->``to_empty`` path and on DTensor parameters (each rank computes its shard).

        Linears are Xavier-uniform as in the MAE reference; ``q``, ``k`` and ``v`` get the bound of
        the reference's fused (3D, D) ``qkv`` weight. Other convolutions and norms get torch's defaults."""
        init = KeyedInit(self, seed)
        qkv = {
            id(lin): 3 * lin.weight.shape[0]
            for m in self.modules()
            if isinstance(m, Attention)
            for lin in (m.q, m.k, m.v)
        }
        for module in self.modules():
            if isinstance(module, nn.Linear):
                _init_linear_like(init, module.weight, module.bias, qkv.get(id(module)))
            elif isinstance(module, (nn.Conv2d, nn.Conv3d)) and module.kernel_size == module.stride:
                _init_linear_like(init, module.weight, module.bias)  # patch projections
            elif module is not self:
                init.reset_(module)  # norms, other convs, LayerScale, per-variable embeddings
        self._init_parameters(init)
        init.check_complete()

    def _init_parameters(self, init: KeyedInit) -> None:
        """Tokens, embeddings and buffers that no submodule owns; families extend this."""
        if self.cls_token is not None:
            init.normal_(self.cls_token, std=0.02)
        if self.use_varemb or self.single_channel:
            init.normal_(self.var_embed, std=0.02)
        self._init_pos_embed(init, "pos_embed")

    # ------------------------------------------------------------------ embedding
    def variable_index(self, variables: Sequence[str] | None, num_channels: int) -> list[int]:
        """Positions in ``self.variables`` of the channels of an input; validates names and count."""
        if variables is None:
            if num_channels != len(self.variables) and not self.single_channel:
                raise ValueError(
                    f"input has {num_channels} channels but the model declares variables={self.variables}; "
                    "pass variables=[...] naming the input's channels"
                )
            variables = self.variables[:num_channels]
        variables = list(variables)
        unknown = [v for v in variables if v not in self.variables]
        if unknown:
            raise ValueError(f"variables {unknown} are unknown; allowed values: {list(self.variables)}")
        if len(variables) != num_channels:
            raise ValueError(f"variables={variables} names {len(variables)} channels, input has {num_channels}")
        if self.single_channel and num_channels != 1:
            raise ValueError(f"single_channel models take 1 channel per batch, got {num_channels}")
        return [self.variables.index(v) for v in variables]

    def embed_channels(self, x: torch.Tensor, variables: Sequence[str] | None = None) -> torch.Tensor:
        """Patch tokens (B, N, D) without positions, from an image (B, C, *img_size) or, with
        adaptive patching, from resized patches (B, L, C, *[patch_size]*ndim). Validates the
        variable names; embeds each channel separately (``use_varemb``) or adds the variable's
        embedding (``single_channel``)."""
        c = x.shape[2] if self.adaptive_patching else x.shape[1]
        idx = self.variable_index(variables, c)
        if self.use_varemb:
            index = torch.tensor(idx, device=x.device)
            if self.adaptive_patching:  # every patch is a one-patch image
                b, length = x.shape[:2]
                tokens = self.patch_embed(x.flatten(0, 1), index).view(b, length, c, -1).transpose(1, 2)
            else:
                tokens = self.patch_embed(x, index)  # (B, C, N, D)
            return self.var_agg(tokens + self.var_embed[index][None, :, None, :])
        tokens = self.patch_embed(x)
        if self.single_channel:
            tokens = tokens + self.var_embed[idx[0]]
        return tokens

    def embed(self, x: torch.Tensor, variables: Sequence[str] | None = None) -> torch.Tensor:
        """Image (B, C, *img_size), or a PatchSequence for adaptive models -> patch tokens with
        positions (B, N, D); no prefix token."""
        if self.adaptive_patching or is_sequence(x):
            return embed_sequence(self, x, variables)
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"input spatial shape {tuple(x.shape[2:])} does not match img_size={self.img_size}")
        tokens = self.embed_channels(x, variables)
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed.to(tokens.dtype)
        return tokens

    def patch_coords(self, batch: int, device: torch.device) -> torch.Tensor:
        """Grid coordinates (B, N, ndim) of the patches, in patch units."""
        return grid_coords(self.grid, device).expand(batch, -1, -1)

    # ------------------------------------------------------------------ transformer
    def rope_for(self, coords: torch.Tensor | None, head_dim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rotary angles for patch tokens at ``coords``, with unrotated prefix tokens; None if off."""
        if not self.rope or coords is None:
            return None
        cos, sin = rope_angles(coords, head_dim)
        if self.num_prefix_tokens:
            pad = (0, 0, self.num_prefix_tokens, 0)
            cos = nn.functional.pad(cos, pad, value=1.0)
            sin = nn.functional.pad(sin, pad, value=0.0)
        return cos, sin

    def drop_path_scales(self, rng: RandomSource, batch: int, device: torch.device) -> torch.Tensor | None:
        """Per-block, per-branch, per-sample stochastic-depth scales (depth, 2, B), or None."""
        if not self.training or self.drop_path_rate == 0.0:
            return None
        rates = torch.linspace(0, self.drop_path_rate, self.depth, device=device).view(-1, 1, 1)
        noise = rand(rng, (batch, self.depth * 2), device).T.reshape(self.depth, 2, batch)
        return (noise >= rates).float() / (1.0 - rates)

    def block_noise(self, rng: RandomSource, x: torch.Tensor, drop_scale: torch.Tensor | None) -> dict:
        """Dropout scales of one encoder block for its input ``x`` (B, N, D), drawn from ``rng`` at
        their global sizes (all heads, all hidden features): keyword arguments of :class:`Block`.
        ``drop_scale`` (2, B) is the block's stochastic depth, merged with the branch dropout."""
        noise = {"drop_scale": drop_scale}
        if not self.training:
            return noise
        (b, n, d), device = x.shape, x.device
        if self.attn_drop_rate > 0:
            noise["prob_scale"] = dropout_scale(rng, (b, self.num_heads, n, n), self.attn_drop_rate, device)
        if self.proj_drop_rate > 0:
            hidden = self.blocks[0].mlp.fc1.out_features
            noise["hidden_scale"] = dropout_scale(rng, (b, n, hidden), self.proj_drop_rate, device)
            branch = dropout_scale(rng, (b, 2, n, d), self.proj_drop_rate, device).transpose(0, 1)
            if drop_scale is not None:
                branch = branch * drop_scale.view(2, b, 1, 1)
            noise["drop_scale"] = branch.contiguous()  # (2, B, N, D)
        return noise

    def prepend_prefix(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cls_token is None:
            return tokens
        return torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)

    def encode(
        self,
        tokens: torch.Tensor,
        coords: torch.Tensor | None,
        rng: RandomSource = None,
        taps: Sequence[int] = (),
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the blocks on patch tokens (B, N, D) at ``coords`` (B, N, ndim); ``valid`` (B, N)
        bool marks real tokens (pad tokens are never attended to), None: all.

        Returns the normalised output with prefix tokens (B, P+N, D) and the raw outputs of the
        blocks listed in ``taps``, one per entry (for UNETR's skip connections).
        """
        x = self.prepend_prefix(tokens)
        if self.training and self.pos_drop_rate > 0:
            x = x * dropout_scale(rng, x.shape, self.pos_drop_rate, x.device).to(x.dtype)
        rope = self.rope_for(coords, self.embed_dim // self.num_heads)
        scales = self.drop_path_scales(rng, x.shape[0], x.device)
        tapped = {}
        valid = with_prefix(valid, self.num_prefix_tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, rope=rope, valid=valid, **self.block_noise(rng, x, None if scales is None else scales[i]))
            if i in taps:
                tapped[i] = x
        return self.norm(x), [tapped[i] for i in taps]

    def forward_features(
        self, x: torch.Tensor, variables: Sequence[str] | None = None, *, rng: RandomSource = None
    ) -> torch.Tensor:
        """Image (or PatchSequence) -> normalised tokens (B, P+N, D)."""
        tokens = self.embed(x, variables)
        coords, valid = token_layout(self, x)
        return self.encode(tokens, coords, rng, valid=valid)[0]

    # ------------------------------------------------------------------ optimiser and checkpoints
    def no_weight_decay(self) -> set[str]:
        """Names (as in ``named_parameters()``) of parameters that get no weight decay: every 1-D
        parameter (norm weights and biases, LayerScale gammas, linear biases), every bias, class and
        mask tokens, position and variable embeddings, and the variable-aggregation query."""
        names = set()
        for name, param in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if param.ndim <= 1 or leaf == "bias" or leaf in _NO_DECAY_NAMES:
                names.add(name)
        return names

    def checkpoint_grid(self, rows: int) -> tuple[int, ...]:
        """The patch grid of a saved position table with ``rows`` rows: this model's aspect ratio
        scaled, else a square/cubic grid."""
        nd = self.ndim
        scaled = tuple(round(g * (rows / self.num_patches) ** (1 / nd)) for g in self.grid)
        for grid in (scaled, (round(rows ** (1 / nd)),) * nd):
            if math.prod(grid) == rows:
                return grid
        raise ValueError(
            f"a saved position table has {rows} rows, which fits neither this model's aspect ratio (grid {self.grid}) "
            "nor a square/cubic grid; resize it first with ucfvit.models.embed.resize_pos_embed(table, old_grid, "
            f"new_grid={self.grid})"
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A learned table saved for another img_size is resampled to this model's grid.
        for name in ("pos_embed", "decoder_pos_embed"):
            table, key = getattr(self, name, None), prefix + name
            saved = state_dict.get(key)
            plain = isinstance(saved, torch.Tensor) and not hasattr(saved, "device_mesh")  # not a DTensor
            if isinstance(table, nn.Parameter) and plain and saved.ndim == 3 and saved.shape[1] != table.shape[1]:
                state_dict[key] = resize_pos_embed(saved, self.checkpoint_grid(saved.shape[1]), self.grid)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class EncoderDecoder(VisionTransformer):
    """Encoder plus a token decoder predicting ``out_chans`` values per pixel of every patch
    (``patch_size**ndim * out_chans`` per token; default ``out_chans``: the input's channels).

    The decoder is a transformer (``decoder_embed`` -> ``decoder_blocks`` -> ``decoder_norm`` ->
    ``decoder_pred``), or with ``linear_decoder=True`` a single ``decoder_pred`` on encoder tokens.

    Args:
        linear_decoder: replace the transformer decoder by one linear map per encoder token.
        decoder_embed_dim: width of the transformer decoder.
        decoder_depth: blocks of the transformer decoder (0 allowed).
        decoder_num_heads: attention heads of the decoder (must be divisible by the mesh's tp).
        decoder_mlp_ratio: MLP width of decoder blocks relative to ``decoder_embed_dim``.
        **encoder_kwargs: see :class:`VisionTransformer`.
    """

    OPTION_RANGES: ClassVar[dict[str, Range]] = {
        "decoder_embed_dim": AT_LEAST_1,
        "decoder_depth": AT_LEAST_0,  # 0: the decoder is its embedding, norm and prediction
        "decoder_num_heads": AT_LEAST_1,
        "decoder_mlp_ratio": POSITIVE,
    }

    def __init__(
        self,
        *,
        out_chans: int | None = None,
        linear_decoder: bool = False,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        **encoder_kwargs,
    ):
        super().__init__(**encoder_kwargs)
        self.linear_decoder = linear_decoder
        self.out_chans = self.data_chans if out_chans is None else out_chans
        out_dim = self.patch_size**self.ndim * self.out_chans
        qkv_bias = self.blocks[0].attn.q.bias is not None if len(self.blocks) else True
        backend = self.blocks[0].attn.backend if len(self.blocks) else "sdpa"
        if linear_decoder:
            self.decoder_pred = nn.Linear(self.embed_dim, out_dim)
            return
        if decoder_embed_dim <= 0 or decoder_depth < 0 or decoder_num_heads <= 0:
            raise ValueError(
                f"decoder_embed_dim={decoder_embed_dim}, decoder_depth={decoder_depth} and "
                f"decoder_num_heads={decoder_num_heads} must be positive (depth may be 0)"
            )
        if decoder_embed_dim % decoder_num_heads:
            raise ValueError(
                f"decoder_embed_dim={decoder_embed_dim} must be divisible by decoder_num_heads={decoder_num_heads}"
            )
        _check_block_shape(decoder_embed_dim, decoder_num_heads, decoder_mlp_ratio, self.rope, "decoder_")
        self.decoder_num_heads = decoder_num_heads
        self.decoder_embed = nn.Linear(self.embed_dim, decoder_embed_dim)
        self._add_pos_embed("decoder_pos_embed", decoder_embed_dim)
        if self.use_adaptive_pos_emb:
            self.decoder_pos_embed_adaptive = AdaptivePosEmbed(self.ndim, decoder_embed_dim)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio=decoder_mlp_ratio, qkv_bias=qkv_bias, backend=backend)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, out_dim)

    def _init_parameters(self, init: KeyedInit) -> None:
        super()._init_parameters(init)
        if not self.linear_decoder:
            self._init_pos_embed(init, "decoder_pos_embed")

    def select_channels(self, pred: torch.Tensor, num_channels: int, variables: Sequence[str] | None) -> torch.Tensor:
        """With variable embeddings the decoder predicts every declared variable (B, N, p**ndim * V):
        keep the input's channels, in the input's order."""
        if not self.use_varemb or self.out_chans != self.data_chans:
            return pred
        idx = torch.tensor(self.variable_index(variables, num_channels), device=pred.device)
        return pred.unflatten(-1, (-1, self.out_chans)).index_select(-1, idx).flatten(-2)

    def decode(
        self,
        x: torch.Tensor,
        coords: torch.Tensor | None,
        pos: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder-width tokens (B, P+N, Dd) -> predictions (B, N, out_dim) with prefix dropped.

        ``pos`` (B or 1, N, Dd) is added to the patch tokens (default: the decoder's own table);
        ``valid`` (B, N) bool excludes pad tokens from attention.
        """
        # Prefix tokens are dropped before the last linear, so the output is a fresh tensor (not a view).
        if self.linear_decoder:
            return self.decoder_pred(x[:, self.num_prefix_tokens :])
        pos = self.decoder_pos_embed if pos is None else pos
        if pos is not None:
            p = self.num_prefix_tokens
            x = torch.cat([x[:, :p], x[:, p:] + pos.to(x.dtype)], dim=1)
        rope = self.rope_for(coords, x.shape[-1] // self.decoder_num_heads)
        valid = with_prefix(valid, self.num_prefix_tokens)
        for block in self.decoder_blocks:
            x = block(x, rope=rope, valid=valid)
        return self.decoder_pred(self.decoder_norm(x)[:, self.num_prefix_tokens :])
