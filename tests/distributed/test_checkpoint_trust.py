"""Checkpoints run no code and detect corruption, on one and on several ranks: whatever an attacker
writes into a checkpoint (with or without rewriting its manifest to match), resuming refuses it on
every rank alike and nothing of it runs; flipped bytes are caught by the manifest; a legitimate
checkpoint still resumes bit-exactly on other meshes; a failing save stops every rank alike.
Saving and reading in one process: tests/unit/test_checkpoint_trust.py."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

import train_runs
from rank_runner import run_ranks
from train_runs import config, losses
from ucfvit.train.checkpoint import CheckpointError, find_checkpoint
from ucfvit.train.dcp_reader import verify_checkpoint
from ucfvit.train.manifest import MANIFEST_FORMAT, verify_structure
from ucfvit.train.trainer import train

# The control loads a checkpoint without a process group, which DCP warns about.
pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
    pytest.mark.xdist_group("checkpoint_trust"),
]  # its module fixture runs once, in one test process

ARGV = ["--model", "vit", "--arch.img-size", "16", "16", "--metrics.log-every", "1"]
STEP2 = "checkpoints/step-00000002"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 4-step run on 2 ranks (1x2x1) that checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("reference")
    argv = [*ARGV, "--mesh", "1x2x1", "--max-steps", "4", "--checkpoint.every", "2", "--checkpoint.keep", "2"]
    run_ranks(2, train_runs.run, "vit", [*argv, "--run.dir", str(run)])
    return run


def test_legitimate_checkpoint_resumes_bit_exactly_on_other_meshes(reference, tmp_path):
    verify_checkpoint(reference / STEP2)
    assert find_checkpoint(reference) == reference / "checkpoints" / "step-00000004"
    assert sorted(verify_structure(reference / STEP2)) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "config.json",
        "optimizer.json",
        "trainer_state.json",
    ]
    ref = losses(reference)
    for world, mesh in [(1, "1x1x1"), (4, "1x2x2")]:
        run = tmp_path / mesh
        argv = [*ARGV, "--mesh", mesh, "--max-steps", "4", "--checkpoint.resume", str(reference / STEP2)]
        assert run_ranks(world, train_runs.run, "vit", [*argv, "--run.dir", str(run)])[0]["steps"] == 4
        resumed = losses(run)
        assert sorted(resumed) == [3, 4]
        for step, (value,) in resumed.items():
            assert abs(value - ref[step][0]) <= 1e-6, (mesh, step, value, ref[step][0])


# --------------------------------------------------------------------------- tampering


class Exec:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def overwrite_start(path: Path, data: bytes) -> None:
    """Put ``data`` at the start of ``path``, keeping its size (so only the hash can tell)."""
    raw = bytearray(path.read_bytes())
    raw[: len(data)] = data
    path.write_bytes(bytes(raw))


def forge_manifest(ckpt: Path) -> None:
    """What an attacker can do too: rewrite manifest.json to match the files as they are now."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in ckpt.iterdir()
        if p.name != "manifest.json"
    }
    (ckpt / "manifest.json").write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files}))


def edit_metadata(ckpt: Path, edit) -> None:
    metadata = pickle.loads((ckpt / ".metadata").read_bytes())  # our own legitimate file
    edit(metadata)
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))


def byte_item(ckpt: Path, marker: Path) -> None:
    """Turn an optimizer ``step`` tensor into a pickled BYTE_IO value (torch.load(weights_only=False))
    whose bytes are appended to a shard."""
    shard = ckpt / "__1_0.distcp"
    payload = pickle.dumps(Exec(marker))
    offset = shard.stat().st_size
    shard.write_bytes(shard.read_bytes() + payload)

    def edit(metadata):
        key = next(k for k in metadata.state_dict_metadata if k.startswith("optim.state.") and k.endswith(".step"))
        metadata.state_dict_metadata[key] = BytesStorageMetadata()
        info = next(v for k, v in metadata.storage_data.items() if k.fqn == key)
        metadata.storage_data = {k: v for k, v in metadata.storage_data.items() if k.fqn != key}
        metadata.storage_data[MetadataIndex(key)] = type(info)("__1_0.distcp", offset, len(payload))

    edit_metadata(ckpt, edit)


def tensor_pickle(ckpt: Path, marker: Path) -> None:
    """A torch.save archive (what a tensor slice is) whose pickle runs code, as a model tensor."""
    shard, archive = ckpt / "__0_0.distcp", io.BytesIO()
    torch.save(Exec(marker), archive)
    offset = shard.stat().st_size
    shard.write_bytes(shard.read_bytes() + archive.getvalue())

    def edit(metadata):
        index = next(k for k in metadata.storage_data if k.fqn == "model.cls_token")
        metadata.storage_data[index] = type(metadata.storage_data[index])(shard.name, offset, len(archive.getvalue()))

    edit_metadata(ckpt, edit)


def escaping_path(ckpt: Path, marker: Path) -> None:
    (ckpt.parent / "evil.distcp").write_bytes(pickle.dumps(Exec(marker)))

    def edit(metadata):
        index = next(iter(metadata.storage_data))
        metadata.storage_data[index].relative_path = "../evil.distcp"

    edit_metadata(ckpt, edit)


def payload_into(name: str):
    return lambda ckpt, marker: overwrite_start(ckpt / name, pickle.dumps(Exec(marker)))


def flip_bytes(ckpt: Path, marker: Path) -> None:
    shard = ckpt / "__1_0.distcp"
    raw = bytearray(shard.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 4):
        raw[i] ^= 0xFF
    shard.write_bytes(bytes(raw))


# name -> (tamper, what the refusal must name: with the manifest left stale, and forged to match)
TAMPER = {
    "metadata_exec": (payload_into(".metadata"), ".metadata does not match", "it references posix.system"),
    "shard_start": (
        payload_into("__0_0.distcp"),
        "__0_0.distcp does not match",
        "__0_0.distcp at byte 0 (for 'model.cls_token') does not hold a tensor",
    ),
    "byte_item": (byte_item, ".metadata has", "as a pickled non-tensor value"),
    "tensor_pickle": (tensor_pickle, ".metadata has", "loads safely (Trying to load unsupported GLOBAL posix.system"),
    "escaping_path": (escaping_path, ".metadata has", "in '../evil.distcp', which is not a __<rank>_<i>.distcp"),
    "config": (payload_into("config.json"), "config.json is not valid JSON", "config.json is not valid JSON"),
    "state": (payload_into("trainer_state.json"), "trainer_state.json does not match", "trainer_state.json is not"),
    "optimizer": (payload_into("optimizer.json"), "optimizer.json does not match", "optimizer.json is not valid"),
    "manifest": (payload_into("manifest.json"), "manifest.json is not valid JSON", None),
    "flipped": (flip_bytes, "__1_0.distcp does not match its sha256", None),
}


def copy_checkpoint(src: Path, run: Path, name: str = "step-00000002") -> Path:
    dst = run / "checkpoints" / name
    shutil.copytree(src, dst)
    return dst


def build_cases(reference: Path, tmp: Path) -> tuple[list[list[str]], dict[str, str]]:
    """Tampered copies of the reference's step-2 checkpoint: ``[name, resume, run_dir]`` per case
    and what each refusal must contain."""
    src = reference / STEP2
    cases, expect = [], {}

    def add(name: str, resume: Path | str, run: Path, expected: str) -> None:
        cases.append([name, str(resume), str(run)])
        expect[name] = expected

    for name, (tamper, stale, forged) in TAMPER.items():
        for manifest, expected in (("stale", stale), ("forged", forged)):
            if expected is None:
                continue
            run = tmp / f"{name}-{manifest}"
            ckpt = copy_checkpoint(src, run)
            tamper(ckpt, tmp / f"MARKER-{name}-{manifest}")
            if manifest == "forged":
                forge_manifest(ckpt)
            add(f"{name}-{manifest}", ckpt, run, expected)

    run = tmp / "old-format"  # written before checkpoints had a manifest
    (copy_checkpoint(src, run) / "manifest.json").unlink()
    add("old-format", run / STEP2, run, "has no manifest.json: it is incomplete, was written by a ucfvit older")
    run = tmp / "newest-old-format"  # not silently skipped for an older checkpoint
    copy_checkpoint(src, run)
    (copy_checkpoint(src, run, "step-00000003") / "manifest.json").unlink()
    add("newest-old-format", "auto", run, "step-00000003 has no manifest.json")

    elsewhere = tmp / "elsewhere"
    copy_checkpoint(src, elsewhere)
    for name, latest in [("latest-relative", f"../../elsewhere/{STEP2}"), ("latest-absolute", elsewhere / STEP2)]:
        run = tmp / name
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "latest").write_text(str(latest))
        add(name, "auto", run, "not a step-N directory beside it: refusing to follow it")
    run = tmp / "latest-pickle"  # binary junk (here a pickle) in place of the latest pointer
    copy_checkpoint(src, run)
    (run / "checkpoints" / "latest").write_bytes(pickle.dumps(Exec(tmp / "MARKER-latest")))
    add("latest-pickle", "auto", run, f"{run / 'checkpoints' / 'latest'} names '")
    run = tmp / "link-outside"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step-00000002").symlink_to(elsewhere / STEP2)
    (run / "checkpoints" / "latest").write_text("step-00000002")
    add("link-outside", "auto", run, f"leads to {elsewhere / STEP2}, outside")

    run = tmp / "legit"
    add("legit", copy_checkpoint(src, run), run, "resumed 3")
    return cases, expect


def resume_each(cases: list[list[str]], argv: list[str]) -> dict[str, str]:
    """For each ``[name, resume, run_dir]``, train ``vit`` resuming from ``resume``; return name ->
    ``"resumed N"`` or ``"<ExceptionType>: <message>"``. Ranks must fail together, or the next
    case would hang."""
    out = {}
    for name, resume, run_dir in cases:
        try:
            result = train(config("vit", [*argv, "--checkpoint.resume", resume, "--run.dir", run_dir]))
            out[name] = f"resumed {result.steps_done}"
        except BaseException as err:  # noqa: B036 -- DCP's CheckpointException is a BaseException
            out[name] = f"{type(err).__name__}: {err}"
    return out


@pytest.mark.parametrize(("world", "mesh"), [(1, "1x1x1"), (4, "1x2x2")])
def test_tampered_checkpoints_are_refused_and_run_nothing(reference, tmp_path, world, mesh):
    cases, expect = build_cases(reference, tmp_path)
    argv = [*ARGV, "--mesh", mesh, "--max-steps", "3"]
    results = run_ranks(world, resume_each, cases, argv, timeout=400)
    for name, expected in expect.items():
        got = {r[name] for r in results}
        assert len(got) == 1, (name, got)  # every rank refuses alike (and no rank was left waiting)
        (message,) = got
        assert expected in message, (name, message)
        if name != "legit":
            assert message.startswith(("CheckpointError:", "ConfigError:")), (name, message)
    assert not list(tmp_path.glob("MARKER*"))


def test_the_payloads_do_run_code_under_plain_dcp(reference, tmp_path):
    """The control: without ucfvit's reader, the crafted .metadata and BYTE_IO item run their code."""
    for name in ("metadata_exec", "byte_item"):
        ckpt, marker = copy_checkpoint(reference / STEP2, tmp_path / name), tmp_path / f"MARKER-{name}"
        TAMPER[name][0](ckpt, marker)
        forge_manifest(ckpt)
        with contextlib.suppress(Exception, CheckpointException):  # the latter is a BaseException
            if name == "metadata_exec":
                FileSystemReader(ckpt).read_metadata()
            else:
                key = next(
                    k
                    for k in pickle.loads((ckpt / ".metadata").read_bytes()).state_dict_metadata
                    if k.endswith(".step")
                )
                state = {"optim": {"state": {key[len("optim.state.") : -len(".step")]: {"step": torch.zeros(())}}}}
                dcp.load(state, checkpoint_id=str(ckpt))
        assert marker.exists(), name
        with pytest.raises(CheckpointError, match="refusing to load|as a pickled non-tensor value"):
            verify_checkpoint(ckpt)


# --------------------------------------------------------------------------- failing saves


def failing_saves(argv: list[str], run_dir: str, fsize: int) -> dict[str, str]:
    """Checkpoint step 2, then try to reach step 4 while writes fail: once because every file
    write beyond ``fsize`` bytes fails (RLIMIT_FSIZE, as a full disk), once because rank 0 cannot
    write the JSON files and manifest (ENOSPC). Return each attempt's error, then resume."""
    import errno
    import resource

    from ucfvit.train import checkpoint

    out = {}
    train(config("vit", [*argv, "--max-steps", "2", "--run.dir", run_dir]))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, hard))
    try:
        train(config("vit", [*argv, "--max-steps", "4", "--run.dir", run_dir]))
    except BaseException as err:  # noqa: B036 -- report anything, even DCP's BaseException
        out["disk full"] = f"{type(err).__name__}: {err}"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    def no_space(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    original = checkpoint.write_atomic
    if dist.get_rank() == 0:
        checkpoint.write_atomic = no_space
    try:
        train(config("vit", [*argv, "--max-steps", "4", "--run.dir", run_dir]))
    except BaseException as err:  # noqa: B036
        out["rank 0 cannot write"] = f"{type(err).__name__}: {err}"
    finally:
        checkpoint.write_atomic = original
    dist.barrier()  # rank 0 has removed the partial step-4 (it did so before raising)
    out["listing"] = " ".join(sorted(p.name for p in (Path(run_dir) / "checkpoints").iterdir()))
    result = train(config("vit", [*argv, "--max-steps", "4", "--run.dir", run_dir]))
    out["afterwards"] = f"resumed to {result.steps_done}"

    # The export (rank 0 writes it) on a full disk; then the same command again.
    from ucfvit.train import export

    def no_space_for_export(tensors, path, metadata):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", path)

    original = export.save_file
    if dist.get_rank() == 0:
        export.save_file = no_space_for_export
    try:
        train(config("vit", [*argv, "--max-steps", "4", "--run.dir", run_dir, "--checkpoint.export-safetensors"]))
        out["export"] = "exported"
    except BaseException as err:  # noqa: B036
        out["export"] = f"{type(err).__name__}: {err}"
    finally:
        export.save_file = original
    dist.barrier()  # rank 0 has failed
    out["export files"] = " ".join(sorted(p.name for p in Path(run_dir).iterdir() if p.name.startswith("model")))
    train(config("vit", [*argv, "--max-steps", "4", "--run.dir", run_dir, "--checkpoint.export-safetensors"]))
    dist.barrier()  # rank 0 has written the export
    out["export afterwards"] = " ".join(sorted(p.name for p in Path(run_dir).iterdir() if p.name.startswith("model")))
    return out


def test_a_failing_save_stops_every_rank_alike_and_keeps_the_last_checkpoint(reference, tmp_path):
    """A full disk during the shard writes (all ranks) and during rank 0's JSON/manifest writes:
    both raise the same CheckpointError on every rank (no rank left waiting), naming the step and
    the checkpoint kept; no partial step-4 stays; resuming afterwards gives the reference losses.
    An export that fails is an ExportError on rank 0, leaves no partial file, and the same command
    again writes it."""
    shard = (reference / STEP2 / "__0_0.distcp").stat().st_size
    run = tmp_path / "run"
    argv = [*ARGV, "--mesh", "1x2x1", "--checkpoint.every", "2"]
    outs = run_ranks(2, failing_saves, argv, str(run), shard // 2)
    export = [o.pop("export") for o in outs]  # rank 0 writes the export
    assert export[1] == "exported" and re.fullmatch(
        rf"ExportError: writing {re.escape(str(run / 'model.safetensors'))} failed \(\[Errno 28\] No space left on "
        r"device: .*\); the checkpoints are intact: free space and run the same command again to export",
        export[0],
    ), export
    assert outs[0] == outs[1], outs
    out, ckpts = outs[0], re.escape(str(run / "checkpoints"))
    causes = {
        # torch's zip writer reports a short write as "unexpected pos", the file system as EFBIG
        "disk full": r"rank \d: (OSError: \[Errno 27\] File too large|RuntimeError: .*unexpected pos)",
        "rank 0 cannot write": r"rank 0, writing the JSON files and the manifest: \[Errno 28\] No space left",
    }
    for case, cause in causes.items():
        assert re.fullmatch(
            rf"CheckpointError: saving checkpoint {ckpts}/step-00000004 failed \({cause}.*\); the last checkpoint, "
            rf"{ckpts}/step-00000002, is intact\. If the disk or quota is full, free space under {ckpts}, then "
            r"resume with --checkpoint.resume auto",
            out[case],
        ), (case, out[case])
    assert out["listing"] == "latest step-00000002"
    assert out["afterwards"] == "resumed to 4"
    assert out["export files"] == ""  # no partial model.safetensors.tmp is left
    assert out["export afterwards"] == "model.safetensors model_config.json"
    ref, resumed = losses(reference), losses(run)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step, (value,) in resumed.items():
        assert abs(value - ref[step][0]) <= 1e-6, (step, value, ref[step][0])
