"""Crash-safe distributed checkpoints that reshard across meshes, run no code and detect corruption.

Layout of ``<run.dir>/checkpoints``::

    step-00000100/      .metadata + __<rank>_<i>.distcp (torch.distributed.checkpoint, tensors only),
                        optimizer.json, trainer_state.json, config.json, manifest.json (written last)
    step-00000200/
    latest              name of the newest complete checkpoint (replaced atomically, last)

A checkpoint is written to ``step-N.tmp/`` and renamed only when every rank has finished, then
``latest`` moves and old checkpoints are pruned: a crash at any moment leaves the previous
checkpoint loadable. Model and optimizer tensors go through DCP (which reshards them onto any
mesh); the optimizer's hyper-parameters (``param_groups``), the trainer state and the config are
JSON. ``manifest.json`` lists every other file with its size and sha256. The data position is a
global sample offset, valid on any mesh.

Loading a checkpoint never runs code from it, whoever wrote it:

- JSON files are only ever read with :mod:`json`;
- DCP's ``.metadata`` pickle is read by an unpickler that builds only the handful of torch classes
  DCP metadata is made of (:data:`_ALLOWED_GLOBALS`); anything else is refused by name, and the
  result is checked (every storage entry is a ``__<r>_<i>.distcp`` file of the checkpoint);
- tensors are read by ``torch.load(weights_only=True)`` from slices that must be ``torch.save``
  archives; the pickled non-tensor values DCP can store (``torch.load(weights_only=False)``) are
  never written and are refused when found.

Corruption is caught before anything is unpickled: :func:`verify_structure` (no collective: names,
sizes, no stray files) runs when the checkpoint is chosen, and the sha256 of every file is
checked by the ranks together at load (:meth:`Checkpointer.load`; :func:`verify_checkpoint` does
it in one process). A save whose writes fail (a full disk) raises the same
:class:`CheckpointError` on every rank and removes its partial copy; a run never prunes the
checkpoint it resumed from. Single-file safetensors export lives in :mod:`ucfvit.train.export`
(``export_safetensors``, ``load_exported``).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path, PosixPath
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.futures import Future
from torch.serialization import _get_layout

__all__ = [
    "Checkpointer", "CheckpointError", "checkpoint_step", "find_checkpoint", "is_complete", "write_atomic",
    "read_checkpoint_config", "verify_structure", "verify_checkpoint", "encode_rng", "decode_rng",
]  # fmt: skip

STATE_FILE, CONFIG_FILE, OPTIM_FILE = "trainer_state.json", "config.json", "optimizer.json"
METADATA, MANIFEST, LATEST = ".metadata", "manifest.json", "latest"
MANIFEST_FORMAT = "ucfvit-checkpoint/1"
_STEP_DIR = re.compile(r"step-([0-9]+)")
_SHARD = re.compile(r"__[0-9]{1,9}_[0-9]{1,9}\.distcp")
_REQUIRED = (METADATA, CONFIG_FILE, STATE_FILE, OPTIM_FILE)
_ZIP_MAGIC = b"PK\x03\x04"  # every tensor slice DCP writes is a torch.save (zip) archive

# Everything a DCP .metadata pickle of model/optimizer tensors refers to (measured on torch 2.13).
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("pathlib", "PosixPath"): PosixPath,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): _get_layout,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    **{
        ("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name)
        for name in (
            "Metadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    },  # fmt: skip
}


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupt, unsafe or not a ucfvit checkpoint."""


def _is_safe_name(name: str) -> bool:
    return name in _REQUIRED or _SHARD.fullmatch(name) is not None


# --------------------------------------------------------------------------- finding checkpoints


def is_complete(path: Path) -> bool:
    """A finished checkpoint: a ``step-N`` directory renamed from .tmp, with its manifest (written last)."""
    path = Path(path)
    return _STEP_DIR.fullmatch(path.name) is not None and (path / MANIFEST).is_file()


def _step_dirs(root: Path) -> list[Path]:
    """``step-N`` entries under ``root``, oldest first (complete or not)."""
    steps = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name)]
    return sorted(steps, key=lambda p: int(p.name[5:]))


def _complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    return [p for p in _step_dirs(root) if is_complete(p)]


def find_checkpoint(run_or_ckpt: Path) -> Path | None:
    """The newest checkpoint under a run directory (or a ``step-N`` checkpoint itself), or None if
    there is none. Raises :class:`CheckpointError` if that checkpoint fails :func:`verify_structure`
    (an older one is not silently used instead), or if ``latest`` or a ``step-N`` link leads out of
    the checkpoints directory. Needs no collective."""
    path = Path(run_or_ckpt)
    if _STEP_DIR.fullmatch(path.name) and path.is_dir():  # named by the user: may live anywhere
        verify_structure(path)
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not root.is_dir():
        return None
    latest = root / LATEST
    if latest.is_file():
        name = latest.read_bytes()[:256].decode("utf-8", "replace").strip()  # a short name, whatever the file holds
        if _STEP_DIR.fullmatch(name) is None:
            raise CheckpointError(
                f"{latest} names {name[:40]!r}, not a step-N directory beside it: refusing to follow it "
                f"(pass the checkpoint with --checkpoint.resume PATH, or remove {latest} to use the newest step-N)"
            )
        if os.path.lexists(root / name):
            return _inside(root, root / name)
        # latest names a checkpoint that is gone (deleted by hand): use the newest one there is
    steps = _step_dirs(root)
    return _inside(root, steps[-1]) if steps else None


def _inside(root: Path, ckpt: Path) -> Path:
    """``ckpt`` (found under ``root``), after checking it stays there and is structurally sound."""
    real = ckpt.resolve()
    if real.parent != root.resolve():
        raise CheckpointError(
            f"{ckpt} leads to {real}, outside {root}: refusing to follow it "
            "(pass that checkpoint explicitly with --checkpoint.resume PATH if you trust it)"
        )
    verify_structure(ckpt)
    return ckpt


def _read_json(path: Path) -> Any:
    """The only way ucfvit reads a file of a checkpoint that is not a tensor shard or .metadata."""
    try:
        return json.loads(Path(path).read_bytes())
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path} is not valid JSON ({str(err)[:200]}): refusing to load the checkpoint") from None


def checkpoint_step(path: Path) -> int:
    """The step number of a ``step-N`` (or ``step-N.tmp``) directory."""
    return int(Path(path).name.split("-")[1].split(".")[0])


def read_checkpoint_config(ckpt: Path) -> dict[str, Any]:
    config = _read_json(Path(ckpt) / CONFIG_FILE)
    if not isinstance(config, dict):
        raise CheckpointError(f"{Path(ckpt) / CONFIG_FILE} does not hold a config (a JSON object)")
    return config


def encode_rng() -> dict[str, str]:
    """Host RNG states as JSON-safe strings (forward randomness is keyed by step, not by these)."""
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def decode_rng(state: dict[str, str]) -> None:
    raw = base64.b64decode(state["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


# --------------------------------------------------------------------------- integrity manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def _describe(ckpt: Path, names: list[str]) -> dict[str, dict]:
    return {name: {"size": (ckpt / name).stat().st_size, "sha256": _sha256(ckpt / name)} for name in names}


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
    manifest = _read_json(manifest_path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{manifest_path} is not a {MANIFEST_FORMAT} manifest")
    for name in sorted(files):
        entry = files[name]
        if not _is_safe_name(name):
            raise CheckpointError(f"{manifest_path} lists {name!r}, which a ucfvit checkpoint never contains")
        if not (
            isinstance(entry, dict)
            and type(entry.get("size")) is int
            and entry["size"] >= 0
            and isinstance(entry.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
        ):
            raise CheckpointError(f"{manifest_path}: the entry of {name} is malformed")
    missing = [name for name in _REQUIRED if name not in files]
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


def _hash_mismatch(ckpt: Path, name: str) -> CheckpointError:
    return CheckpointError(
        f"{ckpt / name} does not match its sha256 in {MANIFEST}: the file is corrupt or was changed after "
        "the checkpoint was written; refusing to load the checkpoint"
    )


def verify_checkpoint(ckpt: Path) -> _SafeReader:
    """Everything :meth:`Checkpointer.load` checks before reading a tensor, in one process: the
    structure, the sha256 of every file, and the DCP metadata. Raises :class:`CheckpointError`;
    returns the verified reader (its metadata read)."""
    files = verify_structure(ckpt)
    for name in sorted(files):
        if _sha256(Path(ckpt) / name) != files[name]["sha256"]:
            raise _hash_mismatch(Path(ckpt), name)
    reader = _SafeReader(ckpt, files)
    reader.read_metadata()
    return reader


def _all_reduce_min(values: list[int]) -> list[int]:
    if not dist.is_initialized():
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor.tolist()


def _verify_hashes_collectively(ckpt: Path, files: dict[str, dict]) -> None:
    """Every rank hashes its share of the files (largest first, round robin), then one all-reduce
    gives every rank the first bad file, so all raise the same error (or none does)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    order = sorted(files, key=lambda name: (-files[name]["size"], name))
    first_bad = len(order)
    for i in range(rank, len(order), world):
        if _sha256(ckpt / order[i]) != files[order[i]]["sha256"]:
            first_bad = i
            break
    # The ranks must also agree on the manifest itself (one file on a shared file system).
    listing = json.dumps(files, sort_keys=True).encode()
    digest = int.from_bytes(hashlib.sha256(listing).digest()[:7], "big")
    first_bad, low, negated_high = _all_reduce_min([first_bad, digest, -digest])
    if low != -negated_high:
        raise CheckpointError(f"the ranks read different {ckpt / MANIFEST} files: refusing to load the checkpoint")
    if first_bad < len(order):
        raise _hash_mismatch(ckpt, order[first_bad])


# --------------------------------------------------------------------------- DCP without pickles


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None and module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            found = getattr(torch, name)
        if found is None:
            raise CheckpointError(
                f"refusing to load {self.path}: it references {module}.{name}, which a ucfvit checkpoint never contains"
            )
        return found


class _SafeReader(FileSystemReader):
    """A DCP reader that unpickles ``.metadata`` with :class:`_RestrictedUnpickler`, checks it
    against the manifest's files, and reads tensors only (``torch.load(weights_only=True)``)."""

    def __init__(self, path: Path, files: dict[str, dict]):
        super().__init__(path)
        self.ckpt = Path(path)
        self.sizes = {name: entry["size"] for name, entry in files.items()}
        self._metadata: dcp_metadata.Metadata | None = None

    def read_metadata(self) -> dcp_metadata.Metadata:  # no **kwargs: DCP never falls back to per-rank files
        if self._metadata is None:
            path = self.ckpt / METADATA
            try:
                metadata = _RestrictedUnpickler(io.BytesIO(path.read_bytes()), path).load()
            except CheckpointError:
                raise
            except Exception as err:  # truncated or malformed pickles raise many types
                raise CheckpointError(f"{path} is not DCP metadata ({type(err).__name__}: {err})") from None
            self._check(metadata, path)
            self._metadata = metadata
        if self._metadata.storage_meta is None:
            self._metadata.storage_meta = dcp_metadata.StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata

    def _check(self, metadata: Any, path: Path) -> None:
        if type(metadata) is not dcp_metadata.Metadata or type(metadata.state_dict_metadata) is not dict:
            raise CheckpointError(f"{path} does not hold DCP metadata")
        for key, item in metadata.state_dict_metadata.items():
            if type(item) is dcp_metadata.BytesStorageMetadata:
                raise CheckpointError(
                    f"{path} lists {key!r} as a pickled non-tensor value, which torch would load with "
                    "weights_only=False; a ucfvit checkpoint holds only tensors: refusing to load it"
                )
            if type(item) is not dcp_metadata.TensorStorageMetadata:
                raise CheckpointError(f"{path}: the entry of {key!r} is not tensor metadata")
        if type(metadata.storage_data) is not dict:
            raise CheckpointError(f"{path} has no storage table")
        for index, info in metadata.storage_data.items():
            key = getattr(index, "fqn", index)
            if type(index) is not dcp_metadata.MetadataIndex or type(info) is not _StorageInfo:
                raise CheckpointError(f"{path}: the storage entry of {key!r} is malformed")
            name = info.relative_path
            if not isinstance(name, str) or _SHARD.fullmatch(name) is None or name not in self.sizes:
                raise CheckpointError(
                    f"{path} stores {key!r} in {name!r}, which is not a __<rank>_<i>.distcp file of {self.ckpt}"
                )
            offset, length, size = info.offset, info.length, self.sizes[name]
            if type(offset) is not int or type(length) is not int or not 0 <= offset <= offset + length <= size:
                raise CheckpointError(f"{path} stores {key!r} at bytes {offset}+{length}, outside {name}")
            if info.transform_descriptors:
                raise CheckpointError(f"{path} stores {key!r} through transforms {info.transform_descriptors!r}")

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        """FileSystemReader.read_data for tensors only: there is no path to ``planner.load_bytes``
        (``torch.load(weights_only=False)``), and every failure names the file and key."""
        per_file: dict[str, list] = {}
        for item in plan.items:
            name = self.storage_data[item.storage_index].relative_path
            if item.type == LoadItemType.BYTE_IO:
                raise CheckpointError(
                    f"refusing to read {item.dest_index.fqn!r} from {self.ckpt / name}: it is a pickled non-tensor "
                    "value (torch.load(weights_only=False)); a ucfvit checkpoint holds only tensors"
                )
            per_file.setdefault(name, []).append(item)
        for name, items in per_file.items():
            with open(self.ckpt / name, "rb") as f:
                for item in items:
                    info, key = self.storage_data[item.storage_index], item.storage_index.fqn
                    where = f"{self.ckpt / name} at byte {info.offset} (for {key!r})"
                    f.seek(info.offset)
                    raw = f.read(info.length)
                    if not raw.startswith(_ZIP_MAGIC):
                        raise CheckpointError(f"{where} does not hold a tensor archive: refusing to read it")
                    try:
                        tensor = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
                        if not isinstance(tensor, torch.Tensor):
                            raise TypeError(f"it holds a {type(tensor).__name__}")
                        for dim, (offset, length) in enumerate(zip(item.storage_offsets, item.lengths, strict=True)):
                            tensor = tensor.narrow(dim, offset, length)  # the part this rank needs
                    except Exception as err:  # weights_only refusals are UnpicklingErrors, broken archives others
                        raise CheckpointError(f"{where}: no tensor torch loads safely ({_reason(err)})") from None
                    target = planner.resolve_tensor(item).detach()
                    if target.size() != tensor.size():
                        raise CheckpointError(f"{where} has shape {tuple(tensor.shape)}, not {tuple(target.shape)}")
                    target.copy_(tensor)
                    planner.commit_tensor(item, target)
        done: Future = Future()
        done.set_result(None)
        return done


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:300]}" if lines else type(err).__name__


def _reason(err: Exception) -> str:
    """The line of a torch.load error that says why, without its advice to retry with weights_only=False."""
    lines = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    if isinstance(err, pickle.UnpicklingError):
        return next((line for line in lines if "GLOBAL" in line), lines[min(1, len(lines) - 1)])
    return lines[0][:300]


def _tensors_only(tree: dict, prefix: str = "") -> None:
    for key, value in tree.items():
        if isinstance(value, dict):
            _tensors_only(value, f"{prefix}{key}.")
        elif not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"cannot checkpoint {prefix}{key} = {type(value).__name__}: DCP would pickle it, and ucfvit "
                "checkpoints hold only tensors (non-tensor state belongs in the JSON files)"
            )


def _groups_to_json(groups: list[dict]) -> list[dict]:
    """Optimizer ``param_groups`` (hyper-parameters + parameter FQNs) as JSON values; the keys
    holding tuples are named so that loading restores them as tuples (bit-exact resume)."""
    out = []
    for group in groups:
        tuples = sorted(k for k, v in group.items() if isinstance(v, tuple))
        for key, value in group.items():
            flat = value if isinstance(value, (list, tuple)) else [value]
            if not all(v is None or isinstance(v, (bool, int, float, str)) for v in flat):
                raise CheckpointError(
                    f"optimizer param_groups[{key!r}] = {value!r} is not a number, string or list of those: "
                    "ucfvit checkpoints store hyper-parameters as JSON"
                )
        out.append({"values": {k: list(v) if k in tuples else v for k, v in group.items()}, "tuples": tuples})
    return out


def _groups_from_json(saved: Any, path: Path) -> list[dict]:
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or not all(
        isinstance(g, dict) and isinstance(g.get("values"), dict) and isinstance(g.get("tuples"), list) for g in groups
    ):
        raise CheckpointError(f"{path} does not hold optimizer param_groups")
    return [{k: tuple(v) if k in g["tuples"] else v for k, v in g["values"].items()} for g in groups]


# --------------------------------------------------------------------------- save and load


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves either the old or the new content."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """Saves and loads model + optimizer (DCP) and the trainer's JSON state in ``run_dir/checkpoints``."""

    def __init__(self, run_dir: Path, keep: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = max(1, keep)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.last_saved: Path | None = None  # the newest checkpoint this run wrote or resumed from
        self.resumed_from: Path | None = None  # never pruned by this run (a branch may start from an old step)

    def _rank0(self, what: str, step_dir: Path, action: Callable[[], None]) -> None:
        """Run ``action`` on rank 0 and tell every rank how it went (this is also the barrier): a
        failed write (a full disk, a quota) raises the same :class:`CheckpointError` on every rank
        instead of leaving the others waiting for rank 0."""
        error = None
        if self.rank == 0:
            try:
                action()
            except OSError as err:
                error = f"rank 0, {what}: {err}"
        if dist.is_initialized():
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise self._save_failed(step_dir, error)

    def _save_failed(self, step_dir: Path, reason: str) -> CheckpointError:
        if self.rank == 0:  # free the space the partial copy holds; the next start would remove it anyway
            shutil.rmtree(step_dir.with_name(step_dir.name + ".tmp"), ignore_errors=True)
        kept = f"the last checkpoint, {self.last_saved}, is intact" if self.last_saved else "no checkpoint was kept"
        return CheckpointError(
            f"saving checkpoint {step_dir} failed ({reason}); {kept}. If the disk or quota is full, free space "
            f"under {self.root}, then resume with --checkpoint.resume auto"
        )

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, config: dict) -> Path:
        """Collective: every rank must call it at the same step. A failed write raises
        :class:`CheckpointError` on every rank and leaves the previous checkpoint as it was."""
        final = self.root / f"step-{step:08d}"
        tmp, aside = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")

        def make_tmp() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
            tmp.mkdir()

        self._rank0("creating the directory", final, make_tmp)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        groups = _groups_to_json(optim_sd["param_groups"])
        tensors = {"model": model_sd, "optim": {"state": optim_sd["state"]}}
        _tensors_only(tensors)
        try:
            dcp.save(tensors, checkpoint_id=str(tmp))
        except CheckpointException as err:  # every rank gets every rank's failures: all raise alike
            rank = min(err.failures)
            raise self._save_failed(final, f"rank {rank}: {_first_line(err.failures[rank][0])}") from None
        # Each rank hashes the shards it wrote and the ranks share them (this is also the barrier).
        # Listed before the exchange: DCP has finished on every rank and rank 0 writes nothing yet.
        names = os.listdir(tmp)
        mine = _describe(tmp, sorted(n for n in names if _SHARD.fullmatch(n) and n.startswith(f"__{self.rank}_")))
        shards = [mine]
        if dist.is_initialized():
            shards = [None] * dist.get_world_size()
            dist.all_gather_object(shards, mine)
        files = {name: entry for part in shards for name, entry in part.items()}
        stray = sorted(set(names) - set(files) - {METADATA})
        if stray:  # the same listing on every rank, so that all of them raise
            raise CheckpointError(f"{tmp} holds {stray}, which no rank accounted for (a DCP writer change?)")

        def finish() -> None:
            write_atomic(tmp / CONFIG_FILE, json.dumps(config, indent=2))
            write_atomic(tmp / STATE_FILE, json.dumps(state))
            write_atomic(tmp / OPTIM_FILE, json.dumps({"param_groups": groups}))
            files.update(_describe(tmp, [METADATA, CONFIG_FILE, STATE_FILE, OPTIM_FILE]))
            write_atomic(tmp / MANIFEST, json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1))
            _fsync_dir(tmp)
            if final.exists():  # the same step saved again (e.g. resumed and stopped at once)
                # Move the old copy aside rather than deleting it first: a crash between the two
                # renames leaves both copies on disk.
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)  # also one left by such a crash
            _fsync_dir(self.root)
            write_atomic(self.root / LATEST, final.name)
            self._prune()

        self._rank0("writing the JSON files and the manifest", final, finish)
        self.last_saved = final
        return final

    def _prune(self) -> None:
        """Keep the newest ``keep`` checkpoints, and the one this run resumed from."""
        for old in _complete_checkpoints(self.root)[: -self.keep]:
            if self.resumed_from is None or old.resolve() != self.resumed_from.resolve():
                shutil.rmtree(old, ignore_errors=True)

    def load(self, ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Load model and optimizer (resharded onto this run's mesh); return the trainer state.

        Collective. Every file is verified against the manifest (hashes shared among the ranks)
        before ``.metadata`` is unpickled or a tensor is read; any refusal is raised on every rank.
        """
        ckpt = Path(ckpt)
        files = verify_structure(ckpt)
        _verify_hashes_collectively(ckpt, files)
        reader = _SafeReader(ckpt, files)
        reader.read_metadata()  # checked here, on every rank, so that a refusal is ours and not DCP's
        groups = _groups_from_json(_read_json(ckpt / OPTIM_FILE), ckpt / OPTIM_FILE)
        state = _read_json(ckpt / STATE_FILE)
        if not isinstance(state, dict):
            raise CheckpointError(f"{ckpt / STATE_FILE} does not hold a trainer state (a JSON object)")
        model_sd, optim_sd = get_state_dict(model, optimizer)
        tensors = {"model": model_sd, "optim": {"state": optim_sd["state"]}}
        try:
            dcp.load(tensors, checkpoint_id=str(ckpt), storage_reader=reader)
        except CheckpointException as err:  # a BaseException carrying each rank's error: raise one, alike everywhere
            failures = [err.failures[rank][0] for rank in sorted(err.failures)]
            exc = next((e for e in failures if isinstance(e, CheckpointError)), failures[0])
            message = str(exc) if isinstance(exc, CheckpointError) else f"loading {ckpt} failed: {exc!r}"
            raise CheckpointError(message) from None
        optim = {"state": tensors["optim"]["state"], "param_groups": groups}
        set_state_dict(model, optimizer, model_state_dict=tensors["model"], optim_state_dict=optim)
        self.last_saved = self.resumed_from = ckpt
        return state


def read_model_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) model tensors of checkpoint ``ckpt``, on the CPU, in module names;
    read in this process alone after :func:`verify_checkpoint` (no collective: for ``--init.from``,
    which every rank reads before the mesh exists)."""
    reader = verify_checkpoint(Path(ckpt))
    metadata = reader.read_metadata()
    model = {
        fqn[len("model.") :]: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for fqn, meta in metadata.state_dict_metadata.items()
        if fqn.startswith("model.") and isinstance(meta, dcp_metadata.TensorStorageMetadata)
    }
    if not model:
        raise CheckpointError(f"{ckpt} holds no model tensors")
    tensors = {"model": model}
    with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(tensors, storage_reader=reader, no_dist=True)
    return tensors["model"]
