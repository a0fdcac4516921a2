"""ucfvit: Vision Transformers for scientific images on PyTorch's DTensor / DeviceMesh stack."""

from .models import build_model, list_models, list_sizes
from .parallel import make_mesh, parallelize

__version__ = "0.1.0"

__all__ = ["__version__", "build_model", "list_models", "list_sizes", "make_mesh", "parallelize"]
