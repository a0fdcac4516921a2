"""Reading small files that someone else may have written, within bounds.

A config, a pointer file (``latest``), a lock, a manifest or a cached index is read through
:func:`read_bounded`: it must be a regular file (a FIFO would block the reader forever, a device
or a directory is a mistake) of at most ``limit`` bytes (a sparse 3 GiB ``latest`` is refused, not
read whole). :func:`read_json` adds that the text is JSON, however deeply nested, and raises one
error naming the file instead of a ``RecursionError`` traceback, and :func:`check_depth` (which it
applies) refuses a value nested deeper than :data:`MAX_DEPTH`, so that code walking it recursively
cannot run out of stack. Every function raises ``error`` (the caller's own error class, a
``ValueError`` by default) with one line that names the file.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

__all__ = ["KIB", "MAX_DEPTH", "MIB", "check_depth", "check_regular", "read_bounded", "read_json"]

KIB, MIB = 1 << 10, 1 << 20
MAX_DEPTH = 64  # lists and mappings in a file we read: configs and manifests need a few levels


def _size(n: int) -> str:
    return f"{n / MIB:.0f} MiB" if n >= MIB else f"{n / KIB:.0f} KiB" if n >= KIB else f"{n} bytes"


def check_regular(path: str | Path, what: str, error: type[Exception] = ValueError) -> os.stat_result:
    """``path``'s stat after checking it is a regular file (links followed); else raise ``error``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: no such file ({what})") from None
    except OSError as err:
        raise error(f"{path}: cannot read {what} ({err.strerror or err})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a FIFO (named pipe), which would block the reader"
            if stat.S_ISFIFO(st.st_mode)
            else "a directory"
            if stat.S_ISDIR(st.st_mode)
            else "not a regular file"
        )
        raise error(f"{path}: {what} must be a regular file, but this is {kind}")
    return st


def read_bounded(path: str | Path, limit: int, what: str, error: type[Exception] = ValueError) -> bytes:
    """The bytes of the regular file ``path``, refused with ``error`` when larger than ``limit``."""
    st = check_regular(path, what, error)
    if st.st_size > limit:
        raise error(f"{path}: {what} holds {_size(st.st_size)}, more than the {_size(limit)} such a file can need")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as err:
        raise error(f"{path}: cannot read {what} ({err.strerror or err})") from None
    if len(data) > limit:  # grew since the stat
        raise error(f"{path}: {what} holds more than the {_size(limit)} such a file can need")
    return data


def check_depth(value: Any, path: str | Path, what: str, error: type[Exception] = ValueError) -> Any:
    """``value`` (parsed JSON or YAML) once its lists and mappings are found to nest at most
    :data:`MAX_DEPTH` deep (walked without recursion); else raise ``error`` naming ``path``."""
    todo = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise error(f"{path}: {what} is nested too deeply to be read (more than {MAX_DEPTH} levels)")
            todo.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return value


def read_json(path: str | Path, limit: int, what: str, error: type[Exception] = ValueError) -> Any:
    """The JSON value in the regular file ``path`` of at most ``limit`` bytes, nested at most
    :data:`MAX_DEPTH` deep; one ``error`` if not."""
    data = read_bounded(path, limit, what, error)
    try:
        value = json.loads(data)
    except RecursionError:
        raise error(f"{path}: {what} is JSON nested too deeply to be read") from None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{path}: {what} is not valid JSON ({str(err)[:200]})") from None
    return check_depth(value, path, what, error)
