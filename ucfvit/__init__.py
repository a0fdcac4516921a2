"""ucfvit: Vision Transformers for scientific images on PyTorch's DTensor / DeviceMesh stack."""

import os

# OpenCV reads its decoders' pixel limit once, when cv2 loads: set it before any module of ours imports
# cv2, to the limit the image reader checks from the header first (data/readers/headers.py MAX_IMAGE_PIXELS).
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 28))

from .models import build_model, list_models, list_sizes  # noqa: E402
from .parallel import make_mesh, parallelize  # noqa: E402

__version__ = "0.1.0"

__all__ = ["__version__", "build_model", "list_models", "list_sizes", "make_mesh", "parallelize"]
