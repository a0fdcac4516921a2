"""Data sources and loaders."""

from .synthetic import SyntheticImages

__all__ = ["SyntheticImages"]
