"""Writes of the run's files: atomic replacement, strict JSON, and one error class for a failed write."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

__all__ = ["WriteError", "fsync_dir", "nulled_nonfinite", "write_atomic"]


class WriteError(OSError):
    """A file of the run could not be written (a full disk, a quota, a lost mount); the message names
    the file. The recipes print it as one line."""


def nulled_nonfinite(value: Any, where: str = "") -> tuple[Any, list[str]]:
    """``value`` (JSON-like) with every NaN or infinite float replaced by None, and the dotted names of
    those entries: what ``json.dumps(allow_nan=False)`` accepts, so the file stays valid JSON for others."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, [where or "(value)"]
    if isinstance(value, dict):
        out, names = {}, []
        for k, v in value.items():
            out[k], found = nulled_nonfinite(v, f"{where}.{k}" if where else str(k))
            names += found
        return out, names
    if isinstance(value, (list, tuple)):
        items = [nulled_nonfinite(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return [v for v, _ in items], [n for _, found in items for n in found]
    return value, []


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves either the old or the new content."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
