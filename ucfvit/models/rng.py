"""Randomness for model forwards that does not depend on how a batch is split.

Every random draw inside a ucfvit forward (MAE masks, drop path, head dropout) has a
batch dimension first and goes through :func:`rand`. The caller chooses the source:

* ``None``: the global torch RNG (plain single-process use);
* a ``torch.Generator``: reproducible draws for this call's batch;
* a :class:`SampleRNG`: draws keyed by (seed, step, global sample index). Every rank draws
  the noise of the *global* batch from the same counter-based seed and keeps only the rows of
  its own samples, so ranks of one tensor-parallel group get identical noise, data-parallel
  ranks get different noise, and the result is the same on any mesh and with any number of
  gradient-accumulation micro-batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["SampleRNG", "rand", "randn", "RandomSource"]

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant, spreads nearby seeds apart


class SampleRNG:
    """Per-sample random draws for rows ``start:start+batch`` of a global batch of ``total``.

    Args:
        seed: run seed.
        step: training step (or any other counter that should change the noise).
        start: global index of the first sample of the local batch.
        total: global batch size of the step (all micro-batches and ranks together).

    Each call to :meth:`rand` is one "draw site"; the k-th call of a forward uses the k-th
    stream, so create one ``SampleRNG`` per forward call.
    """

    def __init__(self, seed: int, step: int, start: int, total: int):
        if not 0 <= start < total:
            raise ValueError(f"SampleRNG: start={start} must lie in [0, total={total})")
        self.seed, self.step, self.start, self.total = int(seed), int(step), int(start), int(total)
        self._site = 0

    def _stream_seed(self) -> int:
        key = (self.seed * _MIX + self.step * 1_000_003 + self._site * 7919) & 0x7FFF_FFFF_FFFF_FFFF
        self._site += 1
        return key

    def rand(self, shape: Sequence[int], device: torch.device | str) -> torch.Tensor:
        """Uniform [0, 1) noise of ``shape`` (batch first) for this rank's samples."""
        batch, rest = int(shape[0]), tuple(shape[1:])
        if self.start + batch > self.total:
            raise ValueError(
                f"SampleRNG: local batch {batch} starting at {self.start} exceeds the global batch {self.total}"
            )
        gen = torch.Generator(device=device).manual_seed(self._stream_seed())
        full = torch.rand((self.total, *rest), generator=gen, device=device)
        return full[self.start : self.start + batch]


RandomSource = torch.Generator | SampleRNG | None


def rand(source: RandomSource, shape: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """Uniform [0, 1) noise of ``shape`` on ``device`` drawn from ``source`` (see module doc)."""
    if source is None:
        return torch.rand(tuple(shape), device=device)
    if isinstance(source, torch.Generator):
        return torch.rand(tuple(shape), generator=source, device=source.device).to(device)
    if isinstance(source, SampleRNG):
        return source.rand(shape, device)
    raise TypeError(f"rng must be None, a torch.Generator or a SampleRNG, got {type(source).__name__}")


def randn(source: RandomSource, shape: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """Standard normal noise from ``source`` (Box-Muller on two :func:`rand` draws, so a
    :class:`SampleRNG` keys it by sample index like every other draw)."""
    u1 = rand(source, shape, device).clamp_min(1e-12)
    u2 = rand(source, shape, device)
    return (-2.0 * u1.log()).sqrt() * torch.cos(2 * torch.pi * u2)
