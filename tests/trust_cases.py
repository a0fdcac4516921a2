"""Worker side of the checkpoint trust tests: resume from many (tampered) checkpoints in one launch."""

from __future__ import annotations

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
