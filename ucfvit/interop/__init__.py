"""Weights in and out: timm ViTs, the MAE reference and UCF-VIT checkpoints, read without unpickling code.

Converters are data plus small reshapes (:mod:`.common`); each takes a state dict in the other
project's names and returns one that ``load_state_dict`` of the matching ucfvit model accepts, or
the other way round (``to_*``). Model code stays plain PyTorch: nothing here touches
``torch.distributed``.
"""

from .common import WeightsError
from .detect import read_pretrained, to_ucfvit_names
from .files import read_weights
from .mae import ENCODER_PREFIXES, encoder_only, from_mae_reference, to_mae_reference
from .pretrained import LoadReport, check_weights, fit_pretrained, load_pretrained
from .timm import from_timm, to_timm
from .ucf_vit import from_ucf_vit, merge_tensor_parallel

__all__ = [
    "ENCODER_PREFIXES",
    "LoadReport",
    "WeightsError",
    "check_weights",
    "encoder_only",
    "fit_pretrained",
    "from_mae_reference",
    "from_timm",
    "from_ucf_vit",
    "load_pretrained",
    "merge_tensor_parallel",
    "read_pretrained",
    "read_weights",
    "to_mae_reference",
    "to_timm",
    "to_ucfvit_names",
]
