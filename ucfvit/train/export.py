"""Single-file export of a trained model: ``model.safetensors`` + ``model_config.json``.

The export holds the full (unsharded) weights and the model's resolved constructor arguments
(family defaults <- size preset <- ``--arch`` options, see
:func:`ucfvit.models.registry.resolved_model_kwargs`), once in ``model_config.json`` and once in the
safetensors header metadata. :func:`load_exported` builds a plain single-device model from them
and checks that the two agree (a head count, ``rope`` or ``pos_embed`` change leaves the tensor
shapes alone, so only the config can tell), that every floating-point tensor of the model is
stored as floating point, and that the state dict fits exactly. Both files are data only: JSON and
safetensors, never pickles.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ucfvit.files import MIB, check_depth, check_regular, read_bounded
from ucfvit.interop import check_weights
from ucfvit.models import build_model
from ucfvit.models.registry import resolved_model_kwargs
from ucfvit.parallel import full_state_dict

from .atomic import write_atomic

__all__ = [
    "CONFIG_FILE",
    "METADATA_KEY",
    "MODEL_FILE",
    "ExportError",
    "export_safetensors",
    "load_exported",
    "read_export_spec",
    "save_exported",
]

MODEL_FILE, CONFIG_FILE = "model.safetensors", "model_config.json"
CONFIG_LIMIT = MIB  # the largest model_config.json read (an export writes a few KiB)
METADATA_KEY = "ucfvit.model_config"
"""Key of the safetensors header metadata that holds ``model_config.json``'s content (as JSON)."""


class ExportError(RuntimeError):
    """The export could not be written (a full disk, a quota); the run's checkpoints are unaffected."""


def export_safetensors(model: nn.Module, spec: dict[str, Any], run_dir: Path) -> None:
    """Write ``model.safetensors`` + ``model_config.json`` (``spec``: ``{"model", "size", "kwargs"}``,
    every constructor argument) to ``run_dir`` (collective gather; rank 0 writes)."""
    state = full_state_dict(model)
    if dist.get_rank() == 0:
        try:
            save_exported(state, spec, run_dir)
        except (OSError, SafetensorError) as err:
            (Path(run_dir) / (MODEL_FILE + ".tmp")).unlink(missing_ok=True)
            raise ExportError(
                f"writing {Path(run_dir) / MODEL_FILE} failed ({err}); the checkpoints are intact: free space and "
                "run the same command again to export"
            ) from None
        print(f"exported {Path(run_dir) / MODEL_FILE}", flush=True)


def save_exported(state: dict[str, torch.Tensor], spec: dict[str, Any], run_dir: str | Path) -> None:
    """Write a full ``state`` dict and its ``spec`` (``{"model", "size", "kwargs"}``) as an export in ``run_dir``."""
    run_dir = Path(run_dir)
    text = json.dumps(spec, indent=2)
    tmp = run_dir / (MODEL_FILE + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={METADATA_KEY: text})
    os.replace(tmp, run_dir / MODEL_FILE)
    write_atomic(run_dir / CONFIG_FILE, text)


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Dotted names of the fields where JSON values ``a`` and ``b`` differ (nested mappings walked)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _differences(a.get(k), b.get(k), f"{where}{k}.")]
    return [] if a == b else [where.rstrip(".")]


def _same_kind(value: Any, default: Any) -> bool:
    """Whether JSON ``value`` can stand where the constructor default ``default`` stands."""
    if value is None or default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):  # a size may also be given per axis
        items = value if isinstance(value, (list, tuple)) else [value]
        return all(isinstance(v, int) and not isinstance(v, bool) for v in items)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    return True


def _check_kwarg_types(config: Path, spec: dict[str, Any]) -> None:
    """A ``ValueError`` naming ``config`` and the field when a constructor argument of ``spec`` has
    another JSON type than the family's default for it (a string for a depth, a list for a flag)."""
    try:
        defaults = resolved_model_kwargs(spec["model"], spec["size"])
    except ValueError as err:
        raise ValueError(f"{config}: {err}") from None
    for name, value in spec["kwargs"].items():
        default = defaults.get(name)
        if not _same_kind(value, default):
            raise ValueError(
                f"{config}: field kwargs.{name} is {value!r} ({type(value).__name__}), but {spec['model']} takes "
                f"a {type(default).__name__} there (e.g. {default!r}); export the model again"
            )


def read_export_spec(weights: Path, config: Path) -> dict[str, Any]:
    """The ``{"model", "size", "kwargs"}`` of an export, ``config`` (``model_config.json``) checked against the
    copy in ``weights``' safetensors header (tensors are not read). Raises ``FileNotFoundError`` for a
    missing file and ``ValueError`` naming the file and the field that is wrong."""
    for path in (config, weights):
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: an export is {MODEL_FILE} + {CONFIG_FILE}, written to the run directory "
                "by --checkpoint.export-safetensors"
            )
        check_regular(path, "an export file", ValueError)  # a FIFO would block the reader
    raw = read_bounded(config, CONFIG_LIMIT, "the export's model config", ValueError)
    try:
        spec = json.loads(raw)
    except RecursionError:
        raise ValueError(f"{config} is nested too deeply to be read") from None
    except ValueError as err:  # JSONDecodeError, or UnicodeDecodeError for a binary file
        raise ValueError(f"{config} is not valid JSON ({err})") from err
    check_depth(spec, config, "the export's model config")
    if not (isinstance(spec, dict) and {"model", "size", "kwargs"} <= set(spec) and isinstance(spec["kwargs"], dict)):
        raise ValueError(f"{config} must be a JSON object with 'model', 'size' and 'kwargs' (a mapping)")
    if not isinstance(spec["model"], str) or not isinstance(spec["size"], (str, type(None))):
        raise ValueError(f"{config}: 'model' and 'size' must be strings (a family and a size name)")
    _check_kwarg_types(config, spec)
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            header = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights} is not a readable safetensors file ({err})") from err
    if header is None:
        raise ValueError(
            f"{weights} has no '{METADATA_KEY}' header metadata, so {CONFIG_FILE} cannot be checked against it; "
            "export it again with --checkpoint.export-safetensors"
        )
    try:
        header_spec = check_depth(json.loads(header), weights, f"its '{METADATA_KEY}' header metadata")
    except RecursionError:
        raise ValueError(f"{weights}: its '{METADATA_KEY}' header metadata is nested too deeply to be read") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{weights}: its '{METADATA_KEY}' header metadata is not valid JSON ({err})") from err
    diffs = _differences(spec, header_spec)
    if diffs:
        raise ValueError(
            f"{config} does not describe {weights}: field(s) {diffs} differ from the config in its header; "
            "the two files come from different exports: copy both from one run directory"
        )
    return spec


def load_exported(run_dir: str | Path, device: str = "cpu") -> nn.Module:
    """A plain single-device model from ``run_dir``'s ``model.safetensors`` + ``model_config.json``.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the field or tensor
    when the files disagree with each other or with the model they describe.
    """
    run_dir = Path(run_dir)
    weights, config = run_dir / MODEL_FILE, run_dir / CONFIG_FILE
    spec = read_export_spec(weights, config)
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            names = f.keys()
            state = {k: f.get_tensor(k) for k in names}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights} is not a readable safetensors file ({err})") from err
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["kwargs"].items()}
    try:
        model = build_model(spec["model"], spec["size"], **kwargs)
    except (TypeError, ValueError, KeyError) as err:  # a field of the wrong type, or an unknown one
        raise ValueError(f"{config}: its 'kwargs' do not build a {spec['model']} model ({err})") from err
    check_weights(model, state, str(weights))  # a WeightsError is a ValueError
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights} does not fit the model of {config}: {err}") from err
    return model.to(device)
