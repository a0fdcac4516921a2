"""``recipes/evaluate.py``: a trained model evaluated on held-out data, on any mesh.

The weights come from a run directory (its newest checkpoint and its ``config.json``), a ``step-N``
DCP checkpoint saved on any mesh (its own ``config.json``), or a ``model.safetensors`` export (its
``model_config.json``). Every check runs before the first collective: the model is built on the
meta device and the weights are fitted to it (they must cover every entry), then the mesh is built,
the model parallelized and loaded, and :class:`~ucfvit.train.validation.Validator` writes
``eval.json`` and a picture into the output directory.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ucfvit.models import build_model, get_family
from ucfvit.parallel import check_parallelizable, make_mesh, parallelize, parse_mesh
from ucfvit.parallel.mesh import world_size

from .atomic import nulled_nonfinite, write_atomic
from .checkpoint import CheckpointError, find_checkpoint, read_checkpoint_config
from .config import ArchConfig, Config, ConfigError, EvalConfig, InitConfig, ParallelConfig, load_config
from .data_setup import input_spec, tree_transform
from .export import CONFIG_FILE as EXPORT_CONFIG
from .export import read_export_spec
from .init_from import load_into, prepare_pretrained
from .plan import model_kwargs
from .ranges import check_ranges
from .throughput import format_metrics
from .validation import Validator, check_eval

__all__ = ["EvaluateConfig", "evaluate"]

RESULT_FILE = "eval.json"


@dataclass
class RunDir:
    dir: Path | None = None
    """A training run directory: its newest checkpoint is evaluated, with its config.json."""


@dataclass
class EvaluateConfig:
    """Evaluate a trained ucfvit model: writes eval.json and a PNG picture."""

    run: RunDir = field(default_factory=RunDir)
    checkpoint: Path | None = None
    """The weights instead of the run's newest checkpoint: a ``step-N`` directory (saved on any mesh) or a
    ``model.safetensors`` export (with its ``model_config.json`` beside it)."""
    mesh: str = "1x1x1"
    """ddp x fsdp x tp of this evaluation (any mesh, whatever the checkpoint was saved on)."""
    out: Path | None = None
    """Directory of eval.json and pictures/ (default: the run directory, else the checkpoint's directory)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def _config_of(args: EvaluateConfig) -> tuple[Config, Path, Path]:
    """``(the training config, the weights, the output directory)`` named by ``args``."""
    if args.run.dir is None and args.checkpoint is None:
        raise ConfigError("name the model to evaluate: --run.dir RUN (its newest checkpoint) or --checkpoint PATH")
    if args.run.dir is not None and not (args.run.dir / "config.json").is_file():
        raise ConfigError(f"--run.dir {args.run.dir} is not a run directory (it has no config.json)")
    if args.checkpoint is not None and args.checkpoint.is_file():
        try:
            spec = read_export_spec(args.checkpoint, args.checkpoint.parent / EXPORT_CONFIG)
        except (OSError, ValueError) as err:
            raise ConfigError(f"--checkpoint {args.checkpoint}: {err}") from None
        kwargs = spec["kwargs"]
        names = {f.name for f in dataclasses.fields(ArchConfig)}
        arch = ArchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items() if k in names})
        cfg = Config(model=spec["model"], model_size=spec["size"], arch=arch)
        if args.run.dir is not None:  # the run says which data it trained on
            cfg = dataclasses.replace(load_config(args.run.dir / "config.json"), arch=arch)
        return cfg, args.checkpoint, args.out or args.run.dir or args.checkpoint.parent
    source = args.checkpoint or args.run.dir
    if not source.exists():
        raise ConfigError(f"{source} does not exist")
    try:
        ckpt = find_checkpoint(source)
    except CheckpointError as err:
        raise ConfigError(f"{source}: {err}") from None
    if ckpt is None:
        raise ConfigError(
            f"{source} holds no checkpoint (step-N): train with --checkpoint.every N or to the end, or pass "
            "--checkpoint PATH"
        )
    try:
        saved = read_checkpoint_config(ckpt)
    except CheckpointError as err:
        raise ConfigError(f"{ckpt}: {err}") from None
    cfg = Config.from_dict(saved)
    return cfg, ckpt, args.out or args.run.dir or ckpt.parent


def evaluate(args: EvaluateConfig) -> dict[str, Any]:
    """Evaluate the model ``args`` names (see the module doc); returns what eval.json holds."""
    cfg, weights, out = _config_of(args)
    cfg = dataclasses.replace(
        cfg, mesh=args.mesh, eval=args.eval, parallel=args.parallel, init=InitConfig(from_=str(weights), parts="all")
    )
    check_ranges(cfg)
    try:
        spec = get_family(cfg.model)
        shape = parse_mesh(cfg.mesh, world_size())
        with torch.device("meta"):
            model = build_model(cfg.model, cfg.model_size, **model_kwargs(cfg))
        check_parallelizable(model, shape.tp, **cfg.parallel.checked_options())
        check_eval(cfg, model, spec, evaluating=True)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    pretrained = prepare_pretrained(cfg.init, model, option="--checkpoint")
    missing = pretrained.report.fresh + list(pretrained.report.skipped)
    if missing:
        raise ConfigError(f"{weights} does not hold this {cfg.model} model entirely:\n{pretrained.report.summary()}")

    mesh = make_mesh(shape, timeout=datetime.timedelta(seconds=cfg.run.collective_timeout))
    device = torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" else torch.device("cpu")
    parallelize(model, mesh, **cfg.parallel.parallelize_options(device.type))
    model.to_empty(device=device)
    model.init_weights()
    load_into(model, pretrained)
    out.mkdir(parents=True, exist_ok=True)
    validator = Validator(
        model, spec, input_spec(model, spec), mesh, cfg, out, spec.build_extra(model), tree_transform(model, cfg.data)
    )
    metrics = validator.run()
    picture = validator.pictures(out / "pictures", f"{cfg.model}_eval")
    result = {
        "model": cfg.model,
        "model_size": cfg.model_size,
        "weights": str(weights),
        "mesh": cfg.mesh,
        "metrics": metrics,
        "picture": None if picture is None else str(picture),
        "eval": dataclasses.asdict(cfg.eval),
        "time": time.time(),
    }
    if dist.get_rank() == 0:
        result, nonfinite = nulled_nonfinite(result)
        if nonfinite:
            print(
                f"warning: {out / RESULT_FILE}: the non-finite metric(s) {', '.join(nonfinite)} written as null",
                file=sys.stderr,
                flush=True,
            )
        write_atomic(out / RESULT_FILE, json.dumps(result, indent=2, default=str, allow_nan=False))
        print(f"{cfg.model} from {weights} on mesh {cfg.mesh}: {format_metrics(metrics)}", flush=True)
        print(f"wrote {out / RESULT_FILE}" + (f" and {picture}" if picture else ""), flush=True)
    return result
