"""The integrity manifest of a checkpoint: what files it holds, their sizes and sha256.

``manifest.json`` is written last, so a checkpoint without one is incomplete. Corruption is caught
before anything is unpickled: :func:`verify_structure` (no collective: names, sizes, no stray
files) runs when the checkpoint is chosen, and the ranks hash the files together at load
(:func:`verify_hashes_collectively`). The file names a checkpoint may hold are defined here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ucfvit.files import KIB, MIB, read_bounded

__all__ = [
    "CONFIG_FILE",
    "JSON_LIMIT",
    "LATEST",
    "LATEST_LIMIT",
    "MANIFEST",
    "MANIFEST_FORMAT",
    "METADATA",
    "OPTIM_FILE",
    "REQUIRED",
    "SHARD",
    "STATE_FILE",
    "STEP_DIR",
    "CheckpointError",
    "file_entries",
    "hash_mismatch",
    "is_safe_name",
    "read_json",
    "sha256",
    "verify_hashes_collectively",
    "verify_structure",
]

STATE_FILE, CONFIG_FILE, OPTIM_FILE = "trainer_state.json", "config.json", "optimizer.json"
METADATA, MANIFEST, LATEST = ".metadata", "manifest.json", "latest"
MANIFEST_FORMAT = "ucfvit-checkpoint/1"
STEP_DIR = re.compile(r"step-([0-9]+)")
SHARD = re.compile(r"__[0-9]{1,9}_[0-9]{1,9}\.distcp")
REQUIRED = (METADATA, CONFIG_FILE, STATE_FILE, OPTIM_FILE)
# The most a JSON file of a checkpoint (its manifest lists every shard) and ``latest`` can need.
JSON_LIMIT, LATEST_LIMIT = 64 * MIB, 4 * KIB


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupt, unsafe or not a ucfvit checkpoint."""


def is_safe_name(name: str) -> bool:
    return name in REQUIRED or SHARD.fullmatch(name) is not None


def read_json(path: Path) -> Any:
    """The only way ucfvit reads a file of a checkpoint that is not a tensor shard or .metadata: a
    regular file of at most :data:`JSON_LIMIT` bytes, refused otherwise (never read whole)."""
    data = read_bounded(path, JSON_LIMIT, "a checkpoint's JSON file", CheckpointError)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path} is not valid JSON ({str(err)[:200]}): refusing to load the checkpoint") from None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(ckpt: Path, names: list[str]) -> dict[str, dict]:
    return {name: {"size": (ckpt / name).stat().st_size, "sha256": sha256(ckpt / name)} for name in names}


def verify_structure(ckpt: Path) -> dict[str, dict]:
    """Cheap checks needing no collective: ``manifest.json`` is present and well formed, lists only
    safe names, and the directory holds exactly those files (regular files, of the listed sizes).
    Returns the manifest's ``{name: {"size", "sha256"}}``; raises :class:`CheckpointError` naming
    the first file that differs."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {ckpt} is not a directory")
    manifest_path = ckpt / MANIFEST
    if not manifest_path.is_file() or manifest_path.is_symlink():
        raise CheckpointError(
            f"checkpoint {ckpt} has no {MANIFEST}: it is incomplete, was written by a ucfvit older than "
            "checkpoint manifests, or is not a ucfvit checkpoint; refusing to load it unverified"
        )
    manifest = read_json(manifest_path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{manifest_path} is not a {MANIFEST_FORMAT} manifest")
    for name in sorted(files):
        entry = files[name]
        if not is_safe_name(name):
            raise CheckpointError(f"{manifest_path} lists {name!r}, which a ucfvit checkpoint never contains")
        if not (
            isinstance(entry, dict)
            and type(entry.get("size")) is int
            and entry["size"] >= 0
            and isinstance(entry.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
        ):
            raise CheckpointError(f"{manifest_path}: the entry of {name} is malformed")
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        raise CheckpointError(f"{manifest_path} does not list {missing[0]}")
    present = {entry.name: entry for entry in os.scandir(ckpt) if entry.name != MANIFEST}
    for name in sorted(set(files) | set(present)):
        if name not in files:
            raise CheckpointError(f"checkpoint {ckpt} holds {name}, which its {MANIFEST} does not list")
        if name not in present:
            raise CheckpointError(f"checkpoint {ckpt} lacks {name}, listed in its {MANIFEST}")
        if not present[name].is_file(follow_symlinks=False):
            raise CheckpointError(f"{ckpt / name} is not a regular file (a link or a directory)")
        size = present[name].stat(follow_symlinks=False).st_size
        if size != files[name]["size"]:
            raise CheckpointError(f"{ckpt / name} has {size} bytes, its {MANIFEST} says {files[name]['size']}")
    return files


def hash_mismatch(ckpt: Path, name: str) -> CheckpointError:
    return CheckpointError(
        f"{ckpt / name} does not match its sha256 in {MANIFEST}: the file is corrupt or was changed after "
        "the checkpoint was written; refusing to load the checkpoint"
    )


def _all_reduce_min(values: list[int]) -> list[int]:
    if not dist.is_initialized():
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor.tolist()


def verify_hashes_collectively(ckpt: Path, files: dict[str, dict]) -> None:
    """Every rank hashes its share of the files (largest first, round robin), then one all-reduce
    gives every rank the first bad file, so all raise the same error (or none does)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    order = sorted(files, key=lambda name: (-files[name]["size"], name))
    first_bad = len(order)
    for i in range(rank, len(order), world):
        if sha256(ckpt / order[i]) != files[order[i]]["sha256"]:
            first_bad = i
            break
    # The ranks must also agree on the manifest itself (one file on a shared file system).
    listing = json.dumps(files, sort_keys=True).encode()
    digest = int.from_bytes(hashlib.sha256(listing).digest()[:7], "big")
    first_bad, low, negated_high = _all_reduce_min([first_bad, digest, -digest])
    if low != -negated_high:
        raise CheckpointError(f"the ranks read different {ckpt / MANIFEST} files: refusing to load the checkpoint")
    if first_bad < len(order):
        raise hash_mismatch(ckpt, order[first_bad])
