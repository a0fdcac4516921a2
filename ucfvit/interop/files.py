"""Reading weights files that someone else wrote, without running code from them.

safetensors files hold tensors only. Other files go through ``torch.load(weights_only=True)``,
which rebuilds tensors and plain containers (dict, list, numbers, strings) and refuses every other
Python object, so a file with a pickle payload is an error, never executed. One class is allowed
besides: ``argparse.Namespace``, the training arguments that the MAE reference and many research
codes save next to the weights (it only holds attributes).
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .common import WeightsError

__all__ = ["read_weights"]


def _refusal(path: Path, error: Exception) -> WeightsError:
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    what = f"a Python object ({found.group(1)})" if found else "Python objects"
    return WeightsError(
        f"{path}: refused: the file holds {what} beyond tensors and plain containers, and ucfvit never "
        "unpickles code from a weights file. If you trust it, re-save only its weights where it was made "
        "(torch.save(model.state_dict(), ...) or safetensors) and load that"
    )


def read_weights(path: str | Path) -> dict[str, Any]:
    """The contents of ``path`` (a ``.safetensors`` file, or a ``torch.save`` file such as ``.pth``,
    ``.pt``, ``.ckpt``, ``.bin``) on the CPU, read without executing anything from it."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    with path.open("rb") as f:
        head = f.read(8)
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise WeightsError(f"{path}: not a readable safetensors file ({error})") from None
    if len(head) < 8:
        raise WeightsError(f"{path}: empty or truncated ({path.stat().st_size} bytes)")
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
