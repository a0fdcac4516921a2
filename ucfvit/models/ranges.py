"""Allowed ranges of numeric options, and the ranges the model constructors declare.

A model class declares the range of each numeric keyword-only argument of its ``__init__`` in a
class attribute right above it, ``OPTION_RANGES = {"embed_dim": AT_LEAST_1, ...}``;
:func:`option_ranges` merges them along the class's bases. The training options built from the
constructors (``--arch.*``) are checked against these before anything is built
(``ucfvit.train.ranges.check_ranges``), so a new constructor option is one edit, next to the
constructor (a test fails while a numeric option has no range).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["AT_LEAST_0", "AT_LEAST_1", "FRACTION", "POSITIVE", "Range", "option_ranges"]


@dataclass(frozen=True)
class Range:
    """An interval of allowed values; ``None`` bounds are open-ended, floats must also be finite."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    """``low`` itself is excluded."""
    high_open: bool = False
    """``high`` itself is excluded."""

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{left}{_number(self.low)}, {_number(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_number(self.high)}"
        return "any value"


def _number(x: float) -> str:
    """``2**64 - 1`` rather than its 20 digits."""
    for k in range(20, 65):
        for offset, text in ((0, ""), (1, " - 1")):
            if x == 2**k - offset:
                return f"2**{k}{text}"
    return f"{x:g}" if isinstance(x, float) else str(x)


AT_LEAST_1 = Range(1)
AT_LEAST_0 = Range(0)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1, high_open=True)  # a probability that must leave something: dropout, masking


def option_ranges(cls: type) -> dict[str, Range]:
    """The ``OPTION_RANGES`` of ``cls`` and its bases (a subclass's entry wins)."""
    out: dict[str, Range] = {}
    for base in reversed(cls.__mro__):
        declared: Mapping[str, Range] = vars(base).get("OPTION_RANGES", {})
        out.update(declared)
    return out
