"""ucfvit models: plain ``nn.Module``s with no distributed code (see ``ucfvit.parallel``)."""

from .diffusion import DDPMScheduler, DiffusionViT
from .encoder import EncoderDecoder, VisionTransformer
from .mae import MAE
from .patches import patchify, unpatchify
from .registry import MODELS, SIZES, build_model, list_models, list_sizes
from .rng import SampleRNG
from .sap import SAP, grid_patches
from .unetr import UNETR
from .vit import ViT

__all__ = [
    "DDPMScheduler", "DiffusionViT", "EncoderDecoder", "MAE", "MODELS", "SAP", "SIZES", "SampleRNG",
    "UNETR", "ViT", "VisionTransformer", "build_model", "grid_patches", "list_models", "list_sizes",
    "patchify", "unpatchify",
]  # fmt: skip
