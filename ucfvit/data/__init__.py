"""Data: readers by name, tiling, adaptive patching, datasets, load balancing and per-rank loaders.

See the README's Data section; ``build_dataset`` is the seam the trainer calls.
"""

from .config import DataConfig, DatasetConfig
from .dataset import InputSpec, Source, build_dataset, register_source
from .readers import DataError, Reader, register_reader
from .synthetic import SyntheticImages

__all__ = [
    "DataConfig",
    "DataError",
    "DatasetConfig",
    "InputSpec",
    "Reader",
    "Source",
    "SyntheticImages",
    "build_dataset",
    "register_reader",
    "register_source",
]
