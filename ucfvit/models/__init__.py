"""ucfvit models: plain ``nn.Module``s with no distributed code (see ``ucfvit.parallel``).

Importing this package registers the built-in families (each module ends with its
``register_family`` call), in the order of ``list_models()``.
"""

# Import order = registration order = list_models() order.
# isort: off
from .vit import ViT
from .mae import MAE
from .unetr import UNETR
from .sap import SAP, grid_patches
from .diffusion import DDPMScheduler, DiffusionViT

# isort: on
from .encoder import EncoderDecoder, VisionTransformer
from .patch_sequence import PatchSequence, pad_sequence
from .patchify import patchify, unpatchify
from .registry import FAMILIES, SIZES, FamilySpec, build_model, get_family, list_models, list_sizes, register_family
from .rng import SampleRNG

__all__ = [
    "DDPMScheduler",
    "DiffusionViT",
    "EncoderDecoder",
    "FAMILIES",
    "FamilySpec",
    "MAE",
    "PatchSequence",
    "SAP",
    "SIZES",
    "SampleRNG",
    "UNETR",
    "ViT",
    "VisionTransformer",
    "build_model",
    "get_family",
    "grid_patches",
    "list_models",
    "list_sizes",
    "pad_sequence",
    "patchify",
    "register_family",
    "unpatchify",
]
