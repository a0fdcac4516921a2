"""``--init.from``: a run that starts from pretrained weights instead of a fresh initialisation.

The weights are read and fitted to the model (on the meta device) while the config is validated,
so an unreadable file, an unknown layout or weights that fit nothing stop every rank before the
first collective. After the model is materialised, the fitted entries are loaded as a full state
dict and sharded onto the mesh.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from ucfvit.interop import ENCODER_PREFIXES, LoadReport, WeightsError, check_weights, fit_pretrained, read_pretrained

from .checkpoint import CheckpointError, find_checkpoint
from .config import ConfigError, InitConfig
from .dcp_reader import read_model_tensors

__all__ = ["Pretrained", "freeze_encoder", "load_into", "prepare_pretrained"]


class Pretrained:
    """Weights fitted to a model: ``state`` (full tensors in the model's names), the report, and a
    description of the source."""

    def __init__(self, state: dict[str, torch.Tensor], report: LoadReport, source: str):
        self.state, self.report, self.source = state, report, source

    def describe(self) -> str:
        return f"initialised from {self.source}: {self.report.summary()}"


def _read(path: Path, option: str) -> tuple[dict[str, torch.Tensor], str]:
    if path.is_dir():
        ckpt = find_checkpoint(path)
        if ckpt is None:
            raise ConfigError(
                f"{option} {path}: a directory, but no ucfvit checkpoint (step-N) in it or in checkpoints/"
            )
        return read_model_tensors(ckpt), f"ucfvit checkpoint {ckpt}"
    state, kind = read_pretrained(path)
    return state, f"{kind} {path}"


def prepare_pretrained(cfg: InitConfig, model: nn.Module, option: str = "--init.from") -> Pretrained | None:
    """Read ``--init.from`` and fit it to ``model`` (meta is fine); None without ``--init.from``.
    Raises :class:`~ucfvit.train.config.ConfigError` naming the file and ``option`` (the flag that
    gave it: ``recipes/evaluate.py`` reads its ``--checkpoint`` this way)."""
    if cfg.from_ is None:
        return None
    path = Path(cfg.from_).expanduser()
    try:
        state, source = _read(path, option)
        check_weights(model, state, source)
    except (WeightsError, CheckpointError) as err:
        raise ConfigError(f"{option}: {err}") from None
    prefixes = ENCODER_PREFIXES if cfg.parts == "encoder" else None
    fitted, report = fit_pretrained(model, state, prefixes)
    if not fitted:
        raise ConfigError(
            f"{option} {path}: no entry of this {source} fits the model (--init.parts {cfg.parts}):\n"
            + report.summary()
        )
    return Pretrained(fitted, report, source)


def freeze_encoder(cfg: InitConfig, model: nn.Module) -> None:
    """With ``--init.freeze-encoder``: the encoder's parameters stop requiring gradients (before
    parallelize, which keeps the flag), so AdamW and the gradient reduction leave them alone."""
    if not cfg.freeze_encoder:
        return
    if cfg.from_ is None:
        raise ConfigError("--init.freeze-encoder keeps pretrained weights fixed: give them with --init.from PATH")
    for name, param in model.named_parameters():
        if name.startswith(ENCODER_PREFIXES):
            param.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("--init.freeze-encoder leaves this model nothing to train (it is all encoder)")


def load_into(model: nn.Module, pretrained: Pretrained) -> None:
    """Load the fitted full tensors into the materialised (possibly parallelized) ``model``. Collective."""
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, pretrained.state, options=options)
