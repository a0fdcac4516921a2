"""Reference forwards and state dicts of other projects, written in the tests from their published
definitions (timm's VisionTransformer, the MAE reference's MaskedAutoencoderViT, their sin-cos
tables), so that converted weights can be checked against them without installing those projects."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _sincos_1d(width: int, pos: torch.Tensor) -> torch.Tensor:
    """The Transformer/MAE 1D table: [sin(p w_i)..., cos(p w_i)...], w_i = 1/10000^(i/(width/2))."""
    omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) / (width / 2))
    out = pos.double().reshape(-1, 1) * omega
    return torch.cat([out.sin(), out.cos()], dim=1)


def mae_2d_table(dim: int, gh: int, gw: int) -> torch.Tensor:
    """MAE's get_2d_sincos_pos_embed(cls_token=True), from its definition: a zero class row, then
    for each patch (row-major) the w coordinate in the first half and the h coordinate in the second."""
    w = torch.arange(gw).repeat(gh)  # meshgrid(w, h)[0], flattened
    h = torch.arange(gh).repeat_interleave(gw)
    patches = torch.cat([_sincos_1d(dim // 2, w), _sincos_1d(dim // 2, h)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), patches])


def ucfvit_3d_table(dim: int, gh: int, gw: int, gd: int) -> torch.Tensor:
    """UCF-VIT's get_3d_sincos_pos_embed: a third of the channels per axis, in the order (h, w, d)."""
    h = _sincos_1d(dim // 3, torch.arange(gh)).repeat_interleave(gw * gd, 0)
    w = _sincos_1d(dim // 3, torch.arange(gw)).repeat_interleave(gd, 0).repeat(gh, 1)
    d = _sincos_1d(dim // 3, torch.arange(gd)).repeat(gh * gw, 1)
    return torch.cat([h, w, d], dim=1)


# ---------------------------------------------------------------- timm Block and ViT
def block_shapes(prefix: str, d: int, qk_norm_and_ls: bool = False, heads: int = 1) -> dict[str, tuple]:
    """Parameter shapes of one timm ``Block`` (fused qkv), optionally with qk_norm and LayerScale."""
    shapes = {f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,)}
    shapes |= {f"{prefix}.attn.qkv.weight": (3 * d, d), f"{prefix}.attn.qkv.bias": (3 * d,)}
    shapes |= {f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,)}
    shapes |= {f"{prefix}.norm2.weight": (d,), f"{prefix}.norm2.bias": (d,)}
    shapes |= {f"{prefix}.mlp.fc1.weight": (4 * d, d), f"{prefix}.mlp.fc1.bias": (4 * d,)}
    shapes |= {f"{prefix}.mlp.fc2.weight": (d, 4 * d), f"{prefix}.mlp.fc2.bias": (d,)}
    if qk_norm_and_ls:
        shapes |= {f"{prefix}.attn.{n}_norm.{w}": (d // heads,) for n in "qk" for w in ("weight", "bias")}
        shapes |= {f"{prefix}.ls1.gamma": (d,), f"{prefix}.ls2.gamma": (d,)}
    return shapes


def random_state(shapes: dict[str, tuple], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors of ``shapes``, norm weights around 1, so every entry matters."""
    return {
        k: torch.randn(s, generator=generator) * (0.5 if len(s) > 1 else 0.2)
        + (1.0 if "norm" in k and "weight" in k else 0)
        for k, s in shapes.items()
    }


def _ln(state, t, p):
    return F.layer_norm(t, t.shape[-1:], state[p + ".weight"], state.get(p + ".bias"), eps=1e-6)


def _lin(state, t, p):
    return F.linear(t, state[p + ".weight"], state.get(p + ".bias"))


def block_forward(state: dict, x: torch.Tensor, p: str, heads: int) -> torch.Tensor:
    """timm's ``Block`` in eval mode: pre-norm attention with fused qkv (rows [q; k; v], head-major),
    optional q/k norms and LayerScale, then the GELU MLP."""
    b, n, d = x.shape
    qkv = _lin(state, _ln(state, x, f"{p}.norm1"), f"{p}.attn.qkv")
    q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
    if f"{p}.attn.q_norm.weight" in state:
        q, k = _ln(state, q, f"{p}.attn.q_norm"), _ln(state, k, f"{p}.attn.k_norm")
    a = _lin(state, F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d), f"{p}.attn.proj")
    x = x + a * state.get(f"{p}.ls1.gamma", 1.0)
    m = _lin(state, F.gelu(_lin(state, _ln(state, x, f"{p}.norm2"), f"{p}.mlp.fc1")), f"{p}.mlp.fc2")
    return x + m * state.get(f"{p}.ls2.gamma", 1.0)


def _patch_embed(state: dict, x: torch.Tensor, patch: int) -> torch.Tensor:
    x = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch)
    return x.flatten(2).transpose(1, 2)


def timm_vit_forward(state: dict, x: torch.Tensor, depth: int, heads: int, patch: int) -> torch.Tensor:
    """timm's VisionTransformer forward (global_pool='avg', fc_norm, class token, pos_embed with a
    class slot, fused qkv, optional qk_norm / LayerScale) in eval mode, written from its definition."""
    x = _patch_embed(state, x, patch)
    x = torch.cat([state["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + state["pos_embed"]
    for i in range(depth):
        x = block_forward(state, x, f"blocks.{i}", heads)
    return _lin(state, _ln(state, x[:, 1:].mean(dim=1), "fc_norm"), "head")


# ---------------------------------------------------------------- MAE reference
def mae_reference_state(
    generator: torch.Generator, *, d: int, depth: int, dd: int, ddepth: int, patch: int, grid: int, chans: int = 3
) -> dict[str, torch.Tensor]:
    """A ``MaskedAutoencoderViT`` state dict with the reference's names and shapes: random weights,
    its fixed sin-cos tables (zero class rows)."""
    shapes = {"patch_embed.proj.weight": (d, chans, patch, patch), "patch_embed.proj.bias": (d,)}
    shapes |= {"cls_token": (1, 1, d), "norm.weight": (d,), "norm.bias": (d,), "mask_token": (1, 1, dd)}
    shapes |= {"decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,)}
    shapes |= {"decoder_norm.weight": (dd,), "decoder_norm.bias": (dd,)}
    shapes |= {"decoder_pred.weight": (patch * patch * chans, dd), "decoder_pred.bias": (patch * patch * chans,)}
    for i in range(depth):
        shapes |= block_shapes(f"blocks.{i}", d)
    for i in range(ddepth):
        shapes |= block_shapes(f"decoder_blocks.{i}", dd)
    state = random_state(shapes, generator)
    state["pos_embed"] = mae_2d_table(d, grid, grid).float().unsqueeze(0)
    state["decoder_pos_embed"] = mae_2d_table(dd, grid, grid).float().unsqueeze(0)
    return state


def mae_reference_forward(
    state: dict, imgs: torch.Tensor, noise: torch.Tensor, *, heads: int, dheads: int, patch: int, mask_ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``MaskedAutoencoderViT.forward`` with random masking by ``noise`` (N, L), from its definition:
    returns (latent with class token, pred (N, L, p*p*C) in its patchify layout, mask)."""
    x = _patch_embed(state, imgs, patch) + state["pos_embed"][:, 1:]
    n, length, d = x.shape
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    x = x.gather(1, ids_shuffle[:, :keep, None].repeat(1, 1, d))
    mask = torch.ones(n, length)
    mask[:, :keep] = 0
    mask = mask.gather(1, ids_restore)
    x = torch.cat([(state["cls_token"] + state["pos_embed"][:, :1]).expand(n, -1, -1), x], dim=1)
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(depth):
        x = block_forward(state, x, f"blocks.{i}", heads)
    latent = _ln(state, x, "norm")

    y = _lin(state, latent, "decoder_embed")
    tokens = torch.cat([y[:, 1:], state["mask_token"].repeat(n, length + 1 - y.shape[1], 1)], dim=1)
    tokens = tokens.gather(1, ids_restore[..., None].repeat(1, 1, y.shape[2]))
    y = torch.cat([y[:, :1], tokens], dim=1) + state["decoder_pos_embed"]
    ddepth = len({k.split(".")[1] for k in state if k.startswith("decoder_blocks.")})
    for i in range(ddepth):
        y = block_forward(state, y, f"decoder_blocks.{i}", dheads)
    pred = _lin(state, _ln(state, y, "decoder_norm"), "decoder_pred")[:, 1:]
    return latent, pred, mask


def mae_reference_patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """The reference's patchify: (N, C, H, W) -> (N, L, p*p*C), channel last within a patch."""
    n, c, h, w = imgs.shape
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


# ---------------------------------------------------------------- UCF-VIT (irlyngaas/UCF-VIT at c114eeb)
def ucf_vit_state(
    generator: torch.Generator, *, d: int, depth: int, patch: int, grid: int, classes: int, variables: int = 0
) -> dict[str, torch.Tensor]:
    """A UCF-VIT ``VIT`` classifier's ``model_state_dict`` as its simple (DDP) mode saves it: ``module.``
    names, a class token, a learned ``pos_embed`` with a class row, the conv patch embedding stored
    again under ``token_embeds``; with ``variables`` > 0 its variable embedding and
    ``VariableMapping_Attention`` aggregation (one conv shared by all variables)."""
    chans = 1 if variables else 3
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + grid * grid, d)}
    shapes |= {"patch_embed.proj.weight": (d, chans, patch, patch), "patch_embed.proj.bias": (d,)}
    shapes |= {"norm.weight": (d,), "norm.bias": (d,), "head.weight": (classes, d), "head.bias": (classes,)}
    if variables:
        shapes |= {"var_embed": (1, variables, d), "var_query": (1, 1, d), "var_agg.q.weight": (d, d)}
        shapes |= {"var_agg.kv.weight": (2 * d, d), "var_agg.proj.weight": (d, d), "var_agg.proj.bias": (d,)}
    for i in range(depth):
        shapes |= block_shapes(f"blocks.{i}", d)
    state = random_state(shapes, generator)
    aliases = [f"token_embeds.{v}.proj" for v in range(variables)] if variables else ["token_embeds.proj"]
    for alias in aliases:
        state[f"{alias}.weight"], state[f"{alias}.bias"] = (
            state["patch_embed.proj.weight"],
            state["patch_embed.proj.bias"],
        )
    return {f"module.{k}": v for k, v in state.items()}


def ucf_vit_forward(state: dict, x: torch.Tensor, *, heads: int, patch: int) -> torch.Tensor:
    """UCF-VIT's ``VIT.forward`` (eval) from its definition: per-variable tokens plus the variable's
    embedding merged by ``VariableMapping_Attention`` (if any), the class token prepended, then the
    position table added, blocks, ``norm``, the class token's features, ``head``."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "var_embed" in state:
        per_var = [_patch_embed(state, x[:, v : v + 1], patch) + state["var_embed"][:, v] for v in range(x.shape[1])]
        tokens = torch.stack(per_var, dim=1)  # B, V, L, D
        b, v, n, d = tokens.shape
        context = tokens.permute(0, 2, 1, 3).reshape(b * n, v, d)
        q = F.linear(state["var_query"].expand(b * n, -1, -1), state["var_agg.q.weight"])
        k, w = F.linear(context, state["var_agg.kv.weight"]).reshape(b * n, v, 2, heads, d // heads).unbind(2)
        q = q.reshape(b * n, 1, heads, d // heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k.transpose(1, 2), w.transpose(1, 2)).transpose(1, 2).reshape(b * n, d)
        x = _lin(state, out, "var_agg.proj").reshape(b, n, d)
    else:
        x = _patch_embed(state, x, patch)
    x = torch.cat([state["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + state["pos_embed"]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(depth):
        x = block_forward(state, x, f"blocks.{i}", heads)
    return _lin(state, _ln(state, x, "norm")[:, 0], "head")


def split_tensor_parallel(state: dict, tp: int) -> list[dict]:
    """UCF-VIT fsdp mode's per-rank files: column-parallel layers by output rows ([q; k; v] and [k; v]
    per part), row-parallel ones by input columns with the bias shared out (the ranks' biases add up)."""
    ranks = [{} for _ in range(tp)]
    for key, value in state.items():
        if key.endswith(("attn.qkv.weight", "attn.qkv.bias", "var_agg.kv.weight")):
            n = 2 if key.endswith("var_agg.kv.weight") else 3
            pieces = [part.chunk(tp) for part in value.chunk(n)]
            shards = [torch.cat([p[r] for p in pieces]) for r in range(tp)]
        elif key.endswith(("mlp.fc1.weight", "mlp.fc1.bias", "var_agg.q.weight")):
            shards = list(value.chunk(tp))
        elif key.endswith(("attn.proj.weight", "mlp.fc2.weight", "var_agg.proj.weight")):
            shards = list(value.chunk(tp, dim=1))
        elif key.endswith(("attn.proj.bias", "mlp.fc2.bias", "var_agg.proj.bias")):
            shards = [value / tp] * tp
        else:
            shards = [value] * tp
        for r in range(tp):
            ranks[r][key] = shards[r].clone()
    return ranks
