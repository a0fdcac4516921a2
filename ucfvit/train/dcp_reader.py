"""Reading DCP checkpoints without running code: DCP's ``.metadata`` pickle through an unpickler that
builds only DCP's own metadata classes, and tensors through ``torch.load(weights_only=True)``.

- DCP's ``.metadata`` pickle is read by an unpickler that builds only the handful of torch classes
  DCP metadata is made of (:data:`_ALLOWED_GLOBALS`); anything else is refused by name, and the
  result is checked (every storage entry is a ``__<r>_<i>.distcp`` file of the checkpoint);
- tensors are read by ``torch.load(weights_only=True)`` from slices that must be ``torch.save``
  archives; the pickled non-tensor values DCP can store (``torch.load(weights_only=False)``) are
  never written and are refused when found.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path, PosixPath
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.futures import Future
from torch.serialization import _get_layout

from .manifest import METADATA, SHARD, CheckpointError, hash_mismatch, sha256, verify_structure

__all__ = ["SafeReader", "read_model_tensors", "verify_checkpoint"]

_ZIP_MAGIC = b"PK\x03\x04"  # every tensor slice DCP writes is a torch.save (zip) archive


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
    },
}


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


class SafeReader(FileSystemReader):
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
            if not isinstance(name, str) or SHARD.fullmatch(name) is None or name not in self.sizes:
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


def _reason(err: Exception) -> str:
    """The line of a torch.load error that says why, without its advice to retry with weights_only=False."""
    lines = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    if isinstance(err, pickle.UnpicklingError):
        return next((line for line in lines if "GLOBAL" in line), lines[min(1, len(lines) - 1)])
    return lines[0][:300]


def verify_checkpoint(ckpt: Path) -> SafeReader:
    """Everything :meth:`Checkpointer.load` checks before reading a tensor, in one process: the
    structure, the sha256 of every file, and the DCP metadata. Raises :class:`CheckpointError`;
    returns the verified reader (its metadata read)."""
    files = verify_structure(ckpt)
    for name in sorted(files):
        if sha256(Path(ckpt) / name) != files[name]["sha256"]:
            raise hash_mismatch(Path(ckpt), name)
    reader = SafeReader(ckpt, files)
    reader.read_metadata()
    return reader


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
