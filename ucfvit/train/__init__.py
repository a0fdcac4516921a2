"""Training: typed configs, recipes, the trainer loop, losses, metrics and checkpoints."""

from .config import Config
from .export import load_exported
from .presets import preset
from .trainer import TrainResult, train

__all__ = ["Config", "TrainResult", "load_exported", "preset", "train"]
