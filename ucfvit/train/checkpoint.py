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

Loading a checkpoint never runs code from it, whoever wrote it: JSON files are only ever read with
:mod:`json`, DCP's metadata and tensors through :mod:`ucfvit.train.dcp_reader`. Corruption is caught
before anything is unpickled, by the sha256 manifest (:mod:`ucfvit.train.manifest`). A save whose
writes fail (a full disk) raises the same :class:`CheckpointError` on every rank and removes its
partial copy; a run never prunes the checkpoint it resumed from. Single-file safetensors export
lives in :mod:`ucfvit.train.export` (``export_safetensors``, ``load_exported``).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ucfvit.files import read_bounded

from .atomic import fsync_dir, write_atomic
from .dcp_reader import SafeReader
from .manifest import (
    CONFIG_FILE,
    LATEST,
    LATEST_LIMIT,
    MANIFEST,
    MANIFEST_FORMAT,
    METADATA,
    OPTIM_FILE,
    SHARD,
    STATE_FILE,
    STEP_DIR,
    CheckpointError,
    file_entries,
    hash_mismatch,
    read_json,
    sha256,
    verify_hashes_collectively,
    verify_structure,
)

__all__ = [
    "Checkpointer",
    "CheckpointError",
    "check_trainer_state",
    "checkpoint_step",
    "decode_rng",
    "encode_rng",
    "find_checkpoint",
    "is_complete",
    "link_refusal",
    "read_checkpoint_config",
    "recorded_step",
    "refuse_outside",
    "verify_step",
]


# --------------------------------------------------------------------------- finding checkpoints


def is_complete(path: Path) -> bool:
    """A finished checkpoint: a ``step-N`` directory renamed from .tmp, with its manifest (written last)."""
    path = Path(path)
    return STEP_DIR.fullmatch(path.name) is not None and (path / MANIFEST).is_file()


def _step_dirs(root: Path) -> list[Path]:
    """``step-N`` entries under ``root``, oldest first (complete or not)."""
    steps = [p for p in root.iterdir() if STEP_DIR.fullmatch(p.name)]
    return sorted(steps, key=lambda p: int(p.name[5:]))


def _complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    return [p for p in _step_dirs(root) if is_complete(p)]


def find_checkpoint(run_or_ckpt: Path) -> Path | None:
    """The newest checkpoint under a run directory (or a ``step-N`` checkpoint itself), or None if
    there is none. Raises :class:`CheckpointError` if that checkpoint fails :func:`verify_structure`
    or :func:`verify_step` (an older one is not silently used instead), if ``latest`` is not a small
    regular file, or if ``latest`` or a ``step-N`` entry is a link. Needs no collective."""
    path = Path(run_or_ckpt)
    if STEP_DIR.fullmatch(path.name) and path.is_dir():  # named by the user: may live anywhere
        verify_step(path, verify_structure(path))
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not root.is_dir():
        return None
    latest = root / LATEST
    if os.path.lexists(latest):
        fix = f"remove {latest} to use the newest step-N, or pass the checkpoint with --checkpoint.resume PATH"
        try:
            raw = read_bounded(latest, LATEST_LIMIT, "the pointer to the newest checkpoint", CheckpointError)
        except CheckpointError as err:
            raise CheckpointError(f"{err}; {fix}") from None
        name = raw.decode("utf-8", "replace").strip()
        if STEP_DIR.fullmatch(name) is None:
            raise CheckpointError(
                f"{latest} names {name[:40]!r}, not a step-N directory beside it: refusing to follow it ({fix})"
            )
        if os.path.lexists(root / name):
            return _inside(root, root / name)
        # latest names a checkpoint that is gone (deleted by hand): use the newest one there is
    steps = _step_dirs(root)
    return _inside(root, steps[-1]) if steps else None


def _inside(root: Path, ckpt: Path) -> Path:
    """``ckpt`` (found under ``root``), after checking it is a directory there (not a link to one)
    whose recorded step is the one its name says, and that it is structurally sound."""
    if ckpt.is_symlink():
        raise link_refusal(root, ckpt)
    verify_step(ckpt, verify_structure(ckpt))
    return ckpt


def link_refusal(root: Path, entry: Path) -> CheckpointError:
    """The refusal of ``entry``, a link among the checkpoints in ``root`` (``step-N`` or ``latest``)."""
    real = entry.resolve()
    if real.parent != Path(root).resolve():
        return CheckpointError(
            f"{entry} leads to {real}, outside {root}: refusing to follow it "
            "(pass that checkpoint explicitly with --checkpoint.resume PATH if you trust it)"
        )
    return CheckpointError(
        f"{entry} is a link to {real}: refusing to follow it (the step-N entry of a run is that step's "
        "checkpoint itself, and latest is a file); replace the link with what it points to, or remove it"
    )


def recorded_step(ckpt: Path) -> object:
    """The ``step`` recorded in ``ckpt``'s trainer state, whatever its type (None if absent)."""
    state = read_json(Path(ckpt) / STATE_FILE)
    return state.get("step") if isinstance(state, dict) else None


def verify_step(ckpt: Path, files: dict[str, dict]) -> int:
    """The step of checkpoint ``ckpt`` (whose manifest lists ``files``, from :func:`verify_structure`):
    the one recorded in its trainer state, which is the truth. Raises :class:`CheckpointError` if
    that file does not match its sha256, or naming the directory and both numbers when the name says
    another step (a renamed or copied directory), or when the recorded step is not an integer >= 0."""
    ckpt = Path(ckpt)
    if sha256(ckpt / STATE_FILE) != files[STATE_FILE]["sha256"]:
        raise hash_mismatch(ckpt, STATE_FILE)
    named, recorded = int(STEP_DIR.fullmatch(ckpt.name).group(1)), recorded_step(ckpt)
    if type(recorded) is not int or recorded < 0:
        raise CheckpointError(
            f"checkpoint {ckpt} records step {recorded!r} in its {STATE_FILE}, not a step number (an integer "
            f">= 0): refusing to resume from it; pass another checkpoint with --checkpoint.resume PATH"
        )
    if recorded != named:
        raise CheckpointError(
            f"checkpoint {ckpt} is named step {named} but records step {recorded} in its {STATE_FILE} (renamed "
            f"or copied by hand?): refusing to resume from it; rename it to step-{recorded:08d} if that is "
            "where it belongs, or move it out of the checkpoints directory"
        )
    return recorded


def refuse_outside(run_dir: Path, path: Path, error: type[Exception] = CheckpointError) -> None:
    """Raise ``error`` if ``path``, an entry a run writes under ``run_dir``, is (or lies under) a link
    leading out of ``run_dir``: a run writes only inside its own directory, never into another run's."""
    real_run, real = Path(run_dir).resolve(), Path(path).resolve()
    if not real.is_relative_to(real_run):
        raise error(
            f"{path} leads to {real}, outside the run directory {real_run}: a run writes only inside its own "
            "directory; replace the link with a directory or file of its own, or choose another --run.dir"
        )


def checkpoint_step(path: Path) -> int:
    """The step number of a ``step-N`` (or ``step-N.tmp``) directory."""
    return int(Path(path).name.split("-")[1].split(".")[0])


def read_checkpoint_config(ckpt: Path) -> dict[str, Any]:
    path = Path(ckpt) / CONFIG_FILE
    config = read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a config (a JSON object)")
    for field, kind, what in (
        ("model", str, "a family name"),
        ("model_size", str, "a size name"),
        ("arch", dict, "a mapping"),
    ):
        if not isinstance(config.get(field), kind):
            raise CheckpointError(
                f"{path}: field {field} is {repr(config.get(field, '(missing)'))[:60]}, not {what}; the file is "
                "damaged or not from a ucfvit run"
            )
    return config


def encode_rng() -> dict[str, str]:
    """Host RNG states as JSON-safe strings (forward randomness is keyed by step, not by these)."""
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def decode_rng(state: dict[str, str]) -> None:
    raw = base64.b64decode(state["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


# --------------------------------------------------------------------------- save and load


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:300]}" if lines else type(err).__name__


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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_groups(saved: list[dict], current: list[dict], path: Path) -> None:
    """Refuse (:class:`CheckpointError` naming ``path`` and the field) optimizer groups that do not
    match this run's: another count, a missing hyper-parameter, or a value of another type."""
    if len(saved) != len(current):
        raise CheckpointError(
            f"{path}: field param_groups holds {len(saved)} group(s), but this run's optimizer has {len(current)}"
        )
    for i, (theirs, mine) in enumerate(zip(saved, current, strict=True)):
        for key, value in mine.items():
            if key == "params" or key not in theirs:  # torch fills a missing option with its default
                continue
            given = theirs[key]
            same = (
                (_is_number(value) and _is_number(given))
                or (isinstance(value, tuple) and isinstance(given, tuple) and len(given) == len(value))
                or value is None
                or given is None
                or type(value) is type(given)
            )
            if not same or (isinstance(given, tuple) and not all(_is_number(v) for v in given if v is not None)):
                raise CheckpointError(
                    f"{path}: field param_groups[{i}].{key} is {given!r}, where this run's optimizer has a "
                    f"{type(value).__name__} ({value!r}); the file is damaged or not from a ucfvit run"
                )


def check_trainer_state(state: dict, ckpt: Path) -> dict:
    """The trainer's ``state`` loaded from ``ckpt``, checked field by field: :class:`CheckpointError`
    naming the file and the field that is missing or of the wrong type (the manifest only tells that
    the file is the one written, and a hand-edited checkpoint may carry a recomputed manifest)."""
    path = Path(ckpt) / STATE_FILE

    def bad(field: str, what: str) -> CheckpointError:
        return CheckpointError(
            f"{path}: field {field} is {repr(state.get(field, '(missing)'))[:60]}, not {what}; the file is damaged "
            "or not from a ucfvit run"
        )

    if type(state.get("step")) is not int or state["step"] < 0:
        raise bad("step", "a non-negative integer")
    positions = state.get("data_positions")
    if not isinstance(positions, dict) or not all(type(v) is int and v >= 0 for v in positions.values()):
        raise bad("data_positions", "a mapping of dataset names to non-negative integers")
    if "lr" in state and not _is_number(state["lr"]):
        raise bad("lr", "a number")
    rng = state.get("rng")
    try:
        raw = base64.b64decode(rng["torch"], validate=True)
    except (TypeError, KeyError, ValueError):
        raise bad("rng", 'a mapping {"torch": base64 of the RNG state}') from None
    if len(raw) != torch.get_rng_state().numel():
        raise bad("rng", f"an RNG state of {torch.get_rng_state().numel()} bytes")
    return state


class Checkpointer:
    """Saves and loads model + optimizer (DCP) and the trainer's JSON state in ``run_dir/checkpoints``."""

    def __init__(self, run_dir: Path, keep: int):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.keep = max(1, keep)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.last_saved: Path | None = None  # the newest checkpoint this run wrote or resumed from
        self.resumed_from: Path | None = None  # never pruned by this run (a branch may start from an old step)

    def _rank0(self, what: str, step_dir: Path, action: Callable[[], None]) -> None:
        """Run ``action`` on rank 0 and tell every rank how it went (this is also the barrier): a
        failed write (a full disk, a quota) raises the same :class:`CheckpointError` on every rank
        instead of leaving the others waiting for rank 0."""
        error, refusal = None, None
        if self.rank == 0:
            try:
                action()
            except CheckpointError as err:  # a refusal (a link leading out of the run dir): said as it is
                refusal = str(err)
            except OSError as err:
                error = f"rank 0, {what}: {err}"
        if dist.is_initialized():
            box = [error, refusal]
            dist.broadcast_object_list(box, src=0)
            error, refusal = box
        if refusal is not None:
            raise CheckpointError(refusal)
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
        if type(step) is not int or step < 0:
            raise CheckpointError(f"refusing to save a checkpoint at step {step!r}: a step is an integer >= 0")
        final = self.root / f"step-{step:08d}"
        tmp, aside = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")

        def make_tmp() -> None:
            for path in (self.root, tmp, final, self.root / LATEST):  # never write through another run's link
                refuse_outside(self.run_dir, path)
            if final.is_symlink():
                raise CheckpointError(f"{final} is a link to {final.resolve()}: refusing to save over it")
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
        mine = file_entries(tmp, sorted(n for n in names if SHARD.fullmatch(n) and n.startswith(f"__{self.rank}_")))
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
            files.update(file_entries(tmp, [METADATA, CONFIG_FILE, STATE_FILE, OPTIM_FILE]))
            write_atomic(tmp / MANIFEST, json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1))
            fsync_dir(tmp)
            if final.exists():  # the same step saved again (e.g. resumed and stopped at once)
                # Move the old copy aside rather than deleting it first: a crash between the two
                # renames leaves both copies on disk.
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)  # also one left by such a crash
            fsync_dir(self.root)
            write_atomic(self.root / LATEST, final.name)
            self._prune()

        self._rank0("writing the JSON files and the manifest", final, finish)
        self.last_saved = final
        return final

    def _prune(self) -> None:
        """Keep the newest ``keep`` checkpoints, and the one this run resumed from; never delete
        through a link (into another run's checkpoints)."""
        refuse_outside(self.run_dir, self.root)
        for old in _complete_checkpoints(self.root)[: -self.keep]:
            if old.is_symlink():
                continue
            if self.resumed_from is None or old.resolve() != self.resumed_from.resolve():
                shutil.rmtree(old, ignore_errors=True)

    def load(self, ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Load model and optimizer (resharded onto this run's mesh); return the trainer state.

        Collective. Every file is verified against the manifest (hashes shared among the ranks)
        before ``.metadata`` is unpickled or a tensor is read; any refusal is raised on every rank.
        """
        ckpt = Path(ckpt)
        files = verify_structure(ckpt)
        verify_hashes_collectively(ckpt, files)
        reader = SafeReader(ckpt, files)
        reader.read_metadata()  # checked here, on every rank, so that a refusal is ours and not DCP's
        groups = _groups_from_json(read_json(ckpt / OPTIM_FILE), ckpt / OPTIM_FILE)
        _check_groups(groups, optimizer.param_groups, ckpt / OPTIM_FILE)
        state = read_json(ckpt / STATE_FILE)
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
