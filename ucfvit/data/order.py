"""Which sample comes next: the order of a dataset's samples, keyed by (seed, dataset, epoch).

A dataset's samples are consumed as one endless stream of positions ``g = 0, 1, 2, ...``:
position ``g`` is sample ``permutation(seed, dataset, epoch)[g % n]`` of epoch ``g // n``. The
stream depends on nothing else (not on the mesh, the rank or the batch size), so a run's data
position is one integer per dataset, the same on every rank, and it means the same thing on any
mesh after a resume. Smaller datasets simply wrap into their next epoch (a new order).
"""

from __future__ import annotations

import numpy as np

__all__ = ["SampleOrder"]


class SampleOrder:
    """Stream position -> sample index of a dataset of ``size`` samples (None: an endless source
    whose position is its sample index, as the synthetic data)."""

    def __init__(self, size: int | None, seed: int, stream: int = 0, shuffle: bool = True):
        if size is not None and size <= 0:
            raise ValueError(f"a dataset needs at least one sample, got size={size}")
        self.size, self.seed, self.stream, self.shuffle = size, seed, stream, shuffle
        self._cache: dict[int, np.ndarray] = {}

    def epoch(self, position: int) -> int:
        return 0 if self.size is None else position // self.size

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of epoch ``epoch``: a permutation of ``range(size)`` drawn from (seed, stream, epoch)."""
        if epoch not in self._cache:
            if len(self._cache) >= 2:  # the current epoch and the next are enough for a stream
                self._cache.pop(min(self._cache))
            rng = np.random.default_rng([self.seed, self.stream, epoch])
            self._cache[epoch] = rng.permutation(self.size) if self.shuffle else np.arange(self.size)
        return self._cache[epoch]

    def __call__(self, position: int) -> int:
        if position < 0:
            raise ValueError(f"stream position {position} must be non-negative")
        if self.size is None:
            return position
        return int(self.permutation(position // self.size)[position % self.size])
