"""ucfvit models: plain ``nn.Module``s with no distributed code (see ``ucfvit.parallel``).

Importing this package registers the built-in families (each module ends with its
``register_family`` call), in the order of ``list_models()``.
"""

from .adaptive import PatchSequence, pad_sequence
from .diffusion import DDPMScheduler, DiffusionViT
from .encoder import EncoderDecoder, VisionTransformer
from .mae import MAE
from .patches import patchify, unpatchify
from .registry import FAMILIES, SIZES, FamilySpec, build_model, get_family, list_models, list_sizes, register_family
from .rng import SampleRNG
from .sap import SAP, grid_patches
from .unetr import UNETR
from .vit import ViT  # noqa: I001  (import order = registration order = list_models() order)

__all__ = [
    "DDPMScheduler", "DiffusionViT", "EncoderDecoder", "FAMILIES", "FamilySpec", "MAE", "PatchSequence", "SAP", "SIZES",
    "SampleRNG", "UNETR", "ViT", "VisionTransformer", "build_model", "get_family", "grid_patches", "list_models",
    "list_sizes", "pad_sequence", "patchify", "register_family", "unpatchify",
]  # fmt: skip
