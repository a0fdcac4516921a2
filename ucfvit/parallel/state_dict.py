"""Gather a parallelized model's parameters into one plain state dict (for safetensors export)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

__all__ = ["full_state_dict"]


def full_state_dict(model: nn.Module, *, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """Gather the unsharded model state dict on CPU (only on rank 0 if ``rank0_only``), with the
    plain module names of an unparallelized model: ready for ``safetensors`` export.

    Collective: every rank of the model's meshes must call it.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    state = get_model_state_dict(model, options=options)
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
