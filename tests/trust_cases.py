"""Worker side of the checkpoint trust tests: resume from many (tampered) checkpoints in one launch,
and saves that fail."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from train_cases import config
from ucfvit.train.trainer import train


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
