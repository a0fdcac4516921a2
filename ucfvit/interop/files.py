"""Reading weights files that someone else wrote, without running code from them.

safetensors files hold tensors only. Other files go through ``torch.load(weights_only=True)``,
which rebuilds tensors and plain containers (dict, list, numbers, strings) and refuses every other
Python object, so a file with a pickle payload is an error, never executed. One class is allowed
besides: ``argparse.Namespace``, the training arguments that the MAE reference and many research
codes save next to the weights (it only holds attributes).

Reading takes memory in proportion to the file: a ``torch.save`` zip whose members declare more than
:data:`MAX_EXPANSION` times the file's size (``torch.save`` stores tensors uncompressed; a 1 MiB
file can hold 1 GiB of deflated zeros) is refused from its zip directory before anything is
inflated, and safetensors checks its own header length and tensor offsets against the file.
"""

from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ucfvit.files import MIB, check_regular

from .common import WeightsError

__all__ = ["MAX_EXPANSION", "read_weights"]

MAX_EXPANSION = 8  # members' declared size / file size of a torch.save zip (its tensors are stored, ratio ~1)


def _refusal(path: Path, error: Exception) -> WeightsError:
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    what = f"a Python object ({found.group(1)})" if found else "Python objects"
    return WeightsError(
        f"{path}: refused: the file holds {what} beyond tensors and plain containers, and ucfvit never "
        "unpickles code from a weights file. If you trust it, re-save only its weights where it was made "
        "(torch.save(model.state_dict(), ...) or safetensors) and load that"
    )


def _check_expansion(path: Path, size: int) -> None:
    """Refuse a zip (a ``torch.save`` file) whose members declare far more bytes than the file holds."""
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # no zip directory that Python reads: torch.load judges the file
    if declared > MAX_EXPANSION * size + MIB:
        raise WeightsError(
            f"{path}: refused: its zip members declare {declared / MIB:,.0f} MiB, more than {MAX_EXPANSION} times "
            f"the file's {size / MIB:,.1f} MiB (torch.save stores tensors uncompressed); re-save the weights with "
            "torch.save or as safetensors"
        )


def read_weights(path: str | Path) -> dict[str, Any]:
    """The contents of ``path`` (a ``.safetensors`` file, or a ``torch.save`` file such as ``.pth``,
    ``.pt``, ``.ckpt``, ``.bin``) on the CPU, read without executing anything from it, in memory
    bounded by the file's size."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such weights file")
    size = check_regular(path, "a weights file", WeightsError).st_size  # a FIFO would block the reader
    with path.open("rb") as f:
        head = f.read(8)
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise WeightsError(f"{path}: not a readable safetensors file ({error})") from None
    if len(head) < 8:
        raise WeightsError(f"{path}: empty or truncated ({size} bytes)")
    if head.startswith(b"PK"):
        _check_expansion(path, size)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            contents = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            raise _refusal(path, error) from None
        raise WeightsError(f"{path}: not a readable torch.save file ({error})") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise WeightsError(f"{path}: not a readable torch.save file ({str(error).splitlines()[0]})") from None
    if not isinstance(contents, dict):
        raise WeightsError(f"{path}: holds a {type(contents).__name__}, expected a dict (a state dict or checkpoint)")
    return contents
