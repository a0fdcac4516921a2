"""Command line of ``recipes/train.py``: a recipe (or a saved config) as defaults, flags on top.

    recipes/train.py --model mae --optim.lr 3e-4           # the mae recipe, one field changed
    recipes/train.py --config runs/a/config.json --max-steps 200   # repeat a run, longer
    recipes/train.py --model mae --config datasets.json     # the recipe, with the file's options on top

A config file may hold every option (a saved ``config.json``) or only some (e.g. ``data.datasets``
for several datasets); the options it leaves out come from the recipe of its ``model`` (or of
``--model``). Model options that the data decides (input size from ``--data.tile``, channels and
classes from the files) follow the data unless the file or the command line sets them (see
``data_setup.defer_to_data``; the files are read when the run is validated, not here).
``--model`` choices are the registered families (``ucfvit.models.list_models()``), read when the
command line is parsed, so a family registered before that is a valid ``--model``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Literal

import torch.distributed as dist
import tyro

from ucfvit.data.readers import DataError
from ucfvit.models import list_models

from .atomic import WriteError
from .checkpoint import CheckpointError
from .config import Config, ConfigError, dotted_options, load_config, read_config_file
from .data_setup import defer_to_data
from .export import ExportError
from .guards import TrainingDiverged
from .presets import preset
from .ranges import check_ranges

__all__ = ["as_argv", "check_argv", "cli_config_class", "parse", "run_recipe"]


def cli_config_class() -> type[Config]:
    """:class:`Config` with ``model`` narrowed to the families registered now (tyro shows them as choices)."""
    names = tuple(list_models())
    model_type = Annotated[Literal[names], tyro.conf.arg(help="Model family (picks the recipe).")]  # type: ignore[valid-type]
    return dataclasses.make_dataclass(
        "Config", [("model", model_type, dataclasses.field(default="mae"))], bases=(Config,)
    )


def _as(cls: type[Config], cfg: Config) -> Config:
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(Config)})


def parse(argv: Sequence[str], description: str | None = None, accelerator: bool | None = None) -> Config:
    """Parse a training command line into a :class:`Config`.

    ``--model``/``--model-size`` pick the recipe whose values become the defaults; ``--config FILE``
    puts the file's options on top of them (a file that names its model may not be given another).
    ``accelerator`` picks the GPU or CPU recipes (None: whether this machine has a GPU), e.g. to check
    a GPU job's options on a login node.
    """
    argv = list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", choices=list_models())
    pre.add_argument("--model-size", "--model_size")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    in_file: set[str] = set()
    if known.config is not None:
        raw = read_config_file(known.config)
        in_file = dotted_options(raw)
        for flag, value, saved in (
            ("--model", known.model, raw.get("model")),
            ("--model-size", known.model_size, raw.get("model_size")),
        ):
            if value is not None and saved is not None and value != saved:
                raise ConfigError(
                    f"{flag} {value} contradicts --config {known.config} ({flag} {saved}): its arch options belong "
                    f"to {saved}; drop {flag}, or start from the recipe without --config"
                )
        index = (
            argv.index("--config")
            if "--config" in argv
            else next(i for i, a in enumerate(argv) if a.startswith("--config="))
        )
        del argv[index : index + (1 if "=" in argv[index] else 2)]
        model, size = raw.get("model") or known.model or "mae", raw.get("model_size") or known.model_size
        if model not in list_models():
            raise ConfigError(f"--config {known.config}: model {model!r} is unknown; choose one of {list_models()}")
        defaults = load_config(known.config, base=preset(model, size, accelerator))
    else:
        defaults = preset(known.model or "mae", known.model_size, accelerator)
    cls = cli_config_class()
    cfg = tyro.cli(cls, default=_as(cls, defaults), args=argv, description=description)
    defer_to_data(cfg, _given(argv) | in_file)  # what the file or the flags set is kept
    return cfg


def check_argv(argv: Sequence[str], accelerator: bool | None = None) -> Config:
    """The config ``recipes/train.py`` makes of ``argv`` (:func:`parse`), its numeric ranges checked:
    every check of the command line that needs no data file, device or other process, for checking a
    job before it is queued (``benchmarks/sweep.py``, the launchers' ``--dry-run``). Raises a one-line
    :class:`ConfigError`: the parser's own message for a misspelt flag or a bad value."""
    text = io.StringIO()
    try:
        with contextlib.redirect_stderr(text), contextlib.redirect_stdout(text):
            cfg = parse(argv, accelerator=accelerator)
        check_ranges(cfg)
    except SystemExit as stop:
        if stop.code in (0, None):  # --help
            raise
        # tyro's box: the message sits between its first two rules
        lines = [line.strip(" │╭╮╰╯") for line in text.getvalue().splitlines()]
        rules = [i for i, line in enumerate(lines) if line and set(line) <= {"-", "─"}]
        body = lines[rules[0] + 1 : rules[1]] if len(rules) > 1 else lines
        message = " ".join(line for line in body if line and "full helptext" not in line)
        after = lines[rules[1] + 1 :] if len(rules) > 1 else []
        meant = [line.split()[0] for line in after if line.startswith("--") and not set(line) <= {"-", "─"}]
        if meant and "Perhaps you meant" in text.getvalue():
            message += f" (did you mean {' or '.join(dict.fromkeys(meant))}?)"
        raise ConfigError(f"recipes/train.py refuses {shlex.join(argv)!r}: {message}") from None
    return cfg


def as_argv(options: Mapping[str, object]) -> list[str]:
    """Command-line arguments for ``options``, flag -> value (``{"--max-steps": 2, "--arch.img-size":
    (16, 16)}`` -> ``["--max-steps", "2", "--arch.img-size", "16", "16"]``); a tuple or list gives
    several values."""
    argv: list[str] = []
    for flag, value in options.items():
        argv += [flag, *map(str, value if isinstance(value, (tuple, list)) else [value])]
    return argv


def _given(argv: Sequence[str]) -> set[str]:
    """Dotted field names set on the command line (``--arch.img-size 16 16`` -> ``arch.img_size``)."""
    return {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}


def _one_line(err: Exception) -> str:
    """The line a recipe prints for an error it expects; anything else keeps its traceback."""
    if isinstance(err, ConfigError):  # a bad option: one line naming it, no traceback
        return f"error: {err}"
    if isinstance(err, TrainingDiverged):  # the same message on every rank; nothing non-finite was saved
        return f"diverged: {err}"
    if isinstance(err, CheckpointError):  # a checkpoint refused at load, or a save that failed (on every rank)
        return f"checkpoint error: {err}"
    if isinstance(err, ExportError):  # rank 0 only; the other ranks have finished
        return f"export error: {err}"
    if isinstance(err, WriteError):  # a full disk while writing a file of the run (rank 0)
        return f"write error: {err}"
    # A file that cannot be read; from a loader worker, its message ends the worker's traceback.
    return f"data error: {str(err).strip().splitlines()[-1].removeprefix(f'{DataError.__module__}.DataError: ')}"


def _peer_failed(err: BaseException) -> bool:
    """Whether ``err`` is how a collective ends on a rank when another rank of the job has died (its
    process group connection closed): that rank printed the cause."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return False
    if isinstance(err, dist.DistError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("connection closed by peer", "connection reset by peer", "broken pipe", "gloo")
    )


def run_recipe(prog: str, body: Callable[[], object]) -> None:
    """Run a recipe's ``body``; an error it expects (bad option, divergence, checkpoint, export, write or
    data error) exits with one line ``prog: kind: message`` instead of a traceback. The line is printed
    before the process group closes, so a rank that failed alone speaks first; the other ranks, whose
    collectives then fail, print one line that points at it instead of a gloo traceback. Every rank then
    closes its process group: left to interpreter exit, gloo's threads can abort the process (SIGABRT,
    pytorch/pytorch#190489)."""
    error = None
    try:
        body()
    except (ConfigError, TrainingDiverged, CheckpointError, ExportError, DataError, WriteError) as err:
        error = _one_line(err)
    except Exception as err:
        if not _peer_failed(err):
            raise
        error = f"rank {dist.get_rank()}: stopped because another rank failed; see its error above"
    if error is not None:
        print(f"{prog}: {error}", file=sys.stderr, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    if error is not None:
        sys.exit(1)
