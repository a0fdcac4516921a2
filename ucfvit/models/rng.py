"""Randomness that does not depend on how a batch is split, at a cost proportional to the local batch.

Every random draw inside a ucfvit forward (MAE masks, drop path, head dropout, diffusion noise
and timesteps) has a batch dimension first and goes through :func:`rand` or :func:`randn`. The
caller chooses the source:

* ``None``: the global torch RNG (plain single-process use);
* a ``torch.Generator``: reproducible draws for this call's batch;
* a :class:`SampleRNG`: draws keyed by (seed, step, draw site, global sample index, element
  index). Each rank computes only the rows of its own samples, so ranks of one tensor-parallel
  group get identical noise, data-parallel ranks get different noise, the result is the same on
  any mesh and with any number of gradient-accumulation micro-batches, and the cost (time and
  memory) is proportional to the local batch, not the global one.

The generator is the counter-based Philox4x32-10 of Salmon et al., "Parallel random numbers: as
easy as 1, 2, 3" (SC'11), the generator behind cuRAND and torch's CUDA RNG, written with int64
tensor ops on 32-bit values (a 32x32-bit product is split into 16-bit halves so that no
intermediate leaves int64 and no unsigned type is needed). It is a pure function of its
counter and key, so it runs on CPU, CUDA and the meta device alike and stays inside a
``torch.compile`` graph. The same function keys the synthetic data (:mod:`ucfvit.data.synthetic`)
and the initial weights (:mod:`ucfvit.models.init`, through :func:`keyed_elements`).

Layout of one draw: counter = (element block, sample, step, stream), key = seed (64 bits), where
element block = flat index within the sample // 4 (each counter gives 4 words of 32 bits, one per
element), sample = global sample index, stream = draw site (bit 31 set for data streams, see
:data:`DATA_STREAM`). A uniform keeps the top 24 bits of its word (exact in float32); a normal
pairs words (0, 1) and (2, 3) of a block through Box-Muller. Initial weights use counter =
(element block of the whole tensor, name, :data:`PARAM_STREAM`), the name taking two words (see
:func:`name_words`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

__all__ = [
    "DATA_STREAM",
    "MAX_KEYED_NUMEL",
    "PARAM_STREAM",
    "RandomSource",
    "SampleRNG",
    "key_schedule",
    "keyed_elements",
    "keyed_rand",
    "keyed_randn",
    "name_words",
    "philox4x32",
    "rand",
    "randn",
]

_MASK32 = 0xFFFF_FFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # key schedule (golden ratio, sqrt(3) - 1)
_ROUNDS = 10
DATA_STREAM = 1 << 31
"""Streams at or above this value belong to data generators; model draw sites count up from 0."""
PARAM_STREAM = _MASK32
"""The stream of parameter initialisation (:func:`keyed_elements`): above every data stream."""
MAX_KEYED_NUMEL = 1 << 34
"""Largest tensor :func:`keyed_elements` draws for (its element blocks must fit in 32 bits)."""
_NAME_KEY = (0x2B7E1516, 0x28AED2A6)  # fixed key of the name hash (any constant would do)

_Word = int | torch.Tensor  # a 32-bit value: a Python int or an int64 tensor holding [0, 2**32)


def _mulhilo(a: _Word, m: int) -> tuple[_Word, _Word]:
    """(high, low) 32-bit halves of the 64-bit product ``a * m`` without leaving int64."""
    hi, lo = a * (m >> 16), a * (m & 0xFFFF)  # each < 2**48
    lo += (hi & 0xFFFF) << 16  # < 2**49; in place (fresh tensors) to halve eager allocations
    hi >>= 16
    hi += lo >> 32
    lo &= _MASK32
    return hi, lo


def key_schedule(key: Sequence[_Word], rounds: int = _ROUNDS) -> list[tuple[_Word, _Word]]:
    """The Philox round keys (k0, k1) of each of ``rounds`` rounds, from a two-word key."""
    k0, k1 = key
    return [((k0 + r * _PHILOX_W[0]) & _MASK32, (k1 + r * _PHILOX_W[1]) & _MASK32) for r in range(rounds)]


def philox4x32(counter: Sequence[_Word], key: Sequence[_Word], rounds: int = _ROUNDS) -> tuple[_Word, ...]:
    """Philox4x32 on four 32-bit counter words and two 32-bit key words; returns four words.

    Words are Python ints or int64 tensors (broadcast against each other) holding values in
    ``[0, 2**32)``. Matches the Random123 known-answer vectors (see tests/unit/test_rng.py).
    """
    return _philox(counter, key_schedule(key, rounds))


def _philox(counter: Sequence[_Word], schedule: Sequence[tuple[_Word, _Word]]) -> tuple[_Word, ...]:
    c0, c1, c2, c3 = counter
    for k0, k1 in schedule:
        hi0, lo0 = _mulhilo(c0, _PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, _PHILOX_M[1])
        x0, x2 = hi1 ^ c1, hi0 ^ c3  # may broadcast to a larger shape: not in place
        x0 ^= k0
        x2 ^= k1
        c0, c1, c2, c3 = x0, lo1, x2, lo0
    return c0, c1, c2, c3


def _key_words(seed: int) -> tuple[int, int]:
    seed &= (1 << 64) - 1
    return seed & _MASK32, seed >> 32


def _bits(
    schedule: Sequence[tuple[_Word, _Word]], step: _Word, stream: int, start: _Word, batch: int, numel: int, device
) -> torch.Tensor:
    """(batch, 4 * ceil(numel / 4)) int64 words in [0, 2**32) for samples start..start+batch-1.

    Every intermediate has at most batch * ceil(numel / 4) elements (one per counter); the result
    has 4 words per counter."""
    blocks = max(1, -(-numel // 4))
    c0 = torch.arange(blocks, dtype=torch.int64, device=device).unsqueeze(0)
    c1 = ((start + torch.arange(batch, dtype=torch.int64, device=device)) & _MASK32).unsqueeze(1)
    words = _philox((c0, c1, step, stream), schedule)
    return torch.stack(torch.broadcast_tensors(*words), dim=-1).flatten(1)


def _uniform(bits: torch.Tensor) -> torch.Tensor:
    """Top 24 bits of each word as a float32 in [0, 1) (every value exactly representable)."""
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _normal(bits: torch.Tensor) -> torch.Tensor:
    """Box-Muller on word pairs (0, 1) and (2, 3) of each block: two standard normals per pair."""
    pairs = bits.unflatten(-1, (-1, 2))
    u1 = ((pairs[..., 0] >> 8) + 1).to(torch.float32) * (1.0 / (1 << 24))  # (0, 1]: log is finite
    theta = _uniform(pairs[..., 1]) * (2 * math.pi)
    radius = (u1.log() * -2.0).sqrt()
    return torch.stack([radius * theta.cos(), radius * theta.sin()], dim=-1).flatten(-2)


def _draw(normal: bool, schedule, step, stream: int, start, shape: Sequence[int], device) -> torch.Tensor:
    batch, rest = int(shape[0]), tuple(int(s) for s in shape[1:])
    numel = math.prod(rest)
    bits = _bits(schedule, step, stream, start, batch, numel, device)
    out = _normal(bits) if normal else _uniform(bits)
    return out[:, :numel].reshape(batch, *rest)


def keyed_rand(seed: int, index: int, stream: int, shape: Sequence[int], device="cpu") -> torch.Tensor:
    """Uniform [0, 1) noise of ``shape`` whose row ``i`` is keyed by (seed, stream, index + i).

    For generators outside a forward (synthetic data): ``index`` is any non-negative int (its
    high 32 bits take the step word), ``stream`` should be ``DATA_STREAM + k``."""
    return _draw(False, key_schedule(_key_words(seed)), index >> 32, stream, index & _MASK32, shape, device)


def keyed_randn(seed: int, index: int, stream: int, shape: Sequence[int], device="cpu") -> torch.Tensor:
    """Standard normal noise, keyed like :func:`keyed_rand`."""
    return _draw(True, key_schedule(_key_words(seed)), index >> 32, stream, index & _MASK32, shape, device)


@functools.lru_cache(maxsize=4096)  # a pure function of the name, asked once per chunk
def name_words(name: str) -> tuple[int, int]:
    """Two 32-bit words that identify ``name`` (a parameter's name): Philox with a fixed key as
    the permutation of a sponge over the UTF-8 bytes, 8 bytes absorbed per call, the byte count
    in the initial state. Stable across processes and Python versions (unlike ``hash``)."""
    data = name.encode("utf-8")
    state: tuple[_Word, ...] = (len(data) & _MASK32, 0, 0, 0)
    data += bytes(-len(data) % 8)
    for i in range(0, len(data), 8):
        lo, hi = int.from_bytes(data[i : i + 4], "little"), int.from_bytes(data[i + 4 : i + 8], "little")
        state = philox4x32((state[0] ^ lo, state[1] ^ hi, state[2], state[3]), _NAME_KEY)
    return int(state[2]), int(state[3])


def keyed_elements(seed: int, name: str, starts: torch.Tensor, length: int, normal: bool) -> torch.Tensor:
    """(R, length) float32 noise for elements ``starts[r] .. starts[r] + length - 1`` (flat indices
    into the whole tensor ``name``): uniform [0, 1) or standard normal.

    Element ``f`` of tensor ``name`` takes word ``f % 4`` of counter (f // 4, name, PARAM_STREAM)
    under key ``seed``, so its value depends on (seed, name, f) only: any set of rows, on any rank,
    gets the values of the same elements of the whole tensor. The work and memory are proportional
    to ``R * length`` (plus at most 6 words per row for the alignment of ``starts`` to 4). The
    block index is one 32-bit word: tensors of up to :data:`MAX_KEYED_NUMEL` elements."""
    blocks = (length + 6) // 4  # counters enough for any alignment of a row start
    counters = (starts >> 2).unsqueeze(1) + torch.arange(blocks, dtype=torch.int64, device=starts.device)
    n0, n1 = name_words(name)
    words = _philox((counters, n0, n1, PARAM_STREAM), key_schedule(_key_words(seed)))
    bits = torch.stack(torch.broadcast_tensors(*words), dim=-1).flatten(1)  # (R, 4 * blocks)
    values = _normal(bits) if normal else _uniform(bits)
    column = (starts & 3).unsqueeze(1) + torch.arange(length, dtype=torch.int64, device=starts.device)
    return values.gather(1, column)


class SampleRNG:
    """Per-sample random draws for rows ``start:start+batch`` of a global batch of ``total``.

    Args:
        seed: run seed (any int; reduced modulo 2**64).
        step: training step (or any other counter that should change the noise; modulo 2**32).
        start: global index of the first sample of the local batch.
        total: global batch size of the step (all micro-batches and ranks together); only used
            to check that a draw stays inside the global batch.

    Each call to :meth:`rand` or :meth:`randn` is one "draw site"; the k-th call of a forward
    uses the k-th stream, so create one ``SampleRNG`` per forward call. Row ``i`` of a draw
    depends only on (seed, step, site, start + i), never on the batch size, so the same samples
    get bitwise the same noise however the global batch is split.

    Seed, step and start are kept in a small int64 tensor: under ``torch.compile`` they are
    graph inputs, so a new step, rank or micro-batch reuses the compiled graph. ``device``: where
    the draws happen; the tensor is copied there once, here, without waiting for the device (from
    pinned memory on CUDA), so a forward makes no host-to-device copy and no host sync.
    """

    def __init__(self, seed: int, step: int, start: int, total: int, device: torch.device | str | None = None):
        if not 0 <= start < total:
            raise ValueError(f"SampleRNG: start={start} must lie in [0, total={total})")
        if total > 1 << 32:
            raise ValueError(f"SampleRNG: total={total} exceeds 2**32 samples per step")
        self.seed, self.step, self.start, self.total = int(seed), int(step), int(start), int(total)
        self._site = 0
        keys = [k for pair in key_schedule(_key_words(self.seed)) for k in pair]
        # round keys, step, start: one tensor, so one host-to-device copy per draw
        words = torch.tensor([*keys, self.step & _MASK32, self.start], dtype=torch.int64)
        if device is not None and torch.device(device).type != "cpu":
            if torch.device(device).type == "cuda":
                words = words.pin_memory()
            words = words.to(device, non_blocking=True)
        self._words = words

    def _next(self, shape: Sequence[int], device, normal: bool) -> torch.Tensor:
        if not torch.compiler.is_compiling() and self.start + int(shape[0]) > self.total:
            raise ValueError(
                f"SampleRNG: local batch {int(shape[0])} starting at {self.start} exceeds the global batch {self.total}"
            )
        site = self._site
        self._site += 1
        words = self._words.to(device)
        schedule = [(words[2 * r], words[2 * r + 1]) for r in range(_ROUNDS)]
        return _draw(normal, schedule, words[-2], site, words[-1], shape, device)

    def rand(self, shape: Sequence[int], device: torch.device | str) -> torch.Tensor:
        """Uniform [0, 1) noise of ``shape`` (batch first) for this rank's samples."""
        return self._next(shape, device, normal=False)

    def randn(self, shape: Sequence[int], device: torch.device | str) -> torch.Tensor:
        """Standard normal noise of ``shape`` (batch first) for this rank's samples (one site)."""
        return self._next(shape, device, normal=True)


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
    """Standard normal noise from ``source``. A :class:`SampleRNG` keys it by sample index like
    every other draw (one draw site); otherwise Box-Muller on two :func:`rand` draws."""
    if isinstance(source, SampleRNG):
        return source.randn(shape, device)
    u1 = rand(source, shape, device).clamp_min(1e-12)
    u2 = rand(source, shape, device)
    return (-2.0 * u1.log()).sqrt() * torch.cos(2 * torch.pi * u2)
