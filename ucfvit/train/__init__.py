"""Training: typed configs, recipes, the trainer loop, losses, metrics and checkpoints."""

from .config import Config
from .presets import preset
from .trainer import TrainResult, load_exported, train

__all__ = ["Config", "TrainResult", "load_exported", "preset", "train"]
