"""The run resolved once: :func:`validate_config` turns a :class:`Config` into a :class:`RunPlan`.

Everything a run derives from its options is computed here, on every rank, before the first
collective, and read from the plan afterwards (the training loop, validation, export, the resume
check), never derived a second time: the model options the data decides, the family and the mesh
shape, the model built on the meta device, every constructor argument, the per-rank batch, its
micro-batches and accumulation, the FSDP/compile wrap and dtypes, what the data pipeline must
produce (input spec, adaptive-patch transform, channel splitting) and what the run does with its
directory. A bad option fails here on every rank at once, as a
:class:`~ucfvit.train.config.ConfigError` naming the option.
"""

from __future__ import annotations

import copy
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ucfvit.data.dataset import InputSpec
from ucfvit.data.loader import TreePatches
from ucfvit.data.readers import DataError
from ucfvit.models import FamilySpec, build_model, get_family
from ucfvit.models.registry import model_arguments, resolved_model_kwargs
from ucfvit.parallel import MeshShape, check_parallelizable, mesh_device_type, parse_mesh, resolve_wrap
from ucfvit.parallel.mesh import world_size

from .checkpoint import read_checkpoint_config
from .config import ARCH_OPTIONS, Config, ConfigError
from .data_setup import adapt_to_data, check_data, check_run_dir_outside_data, input_spec, tree_transform
from .hooks import check_sinks
from .init_from import Pretrained, freeze_encoder, prepare_pretrained
from .ranges import check_ranges, flag
from .run_dir import RunDirPlan, inspect_run_dir
from .validation import check_eval

__all__ = [
    "RUNTIME_OPTIONS",
    "BatchSplit",
    "RunPlan",
    "batch_split",
    "build_checked_model",
    "model_kwargs",
    "validate_config",
]

# Model options that change only what a forward computes, not the checkpoint's tensors: a resumed
# run may change them. Every other option of the family must match the checkpoint's.
RUNTIME_OPTIONS = {
    "attn_backend",
    "drop_path_rate",
    "drop_rate",
    "attn_drop_rate",
    "proj_drop_rate",
    "pos_drop_rate",
    "patch_drop_rate",
    "mask_ratio",
    "norm_pix_loss",
}


@dataclass(frozen=True)
class BatchSplit:
    """How a step's global batch is split: ``local`` samples per data-parallel rank, in
    ``accumulation`` micro-batches of ``micro`` samples."""

    local: int
    micro: int
    accumulation: int


@dataclass
class RunPlan:
    """Everything :func:`validate_config` resolves once (see the module doc).

    Attributes:
        cfg: the run's config with the model options the data decides filled in (what the run
            prints and saves as ``config.json``).
        spec: the model family.
        shape: the mesh shape.
        model: the model on the meta device, not yet parallelized.
        model_kwargs: every constructor argument of ``model`` (family defaults <- size preset <-
            ``--arch``): what an export records and a resume compares.
        batch: the per-rank batch, micro-batch and accumulation.
        device_type: ``"cuda"`` or ``"cpu"``, what the mesh will be built on.
        wrap: ``"model"`` or ``"blocks"``, the FSDP/compile units ``--parallel.wrap`` resolves to.
        parallelize_options: the keyword arguments of ``parallelize`` (dtypes included).
        inputs: what the data pipeline must produce for ``model``.
        tree: the quadtree/octree transform of the samples (adaptive patches cut by the loader, one
            tree per channel with ``--data.separate-channels``), or None.
        run: what the run does with its directory (checkpoint to resume, branch to move aside).
        pretrained: the ``--init.from`` weights fitted to ``model`` (None: none, or resuming).
    """

    cfg: Config
    spec: FamilySpec
    shape: MeshShape
    model: nn.Module
    model_kwargs: dict[str, Any]
    batch: BatchSplit
    device_type: str
    wrap: str
    parallelize_options: dict[str, Any]
    inputs: InputSpec
    tree: TreePatches | None
    run: RunDirPlan
    pretrained: Pretrained | None = None

    @property
    def checkpoint(self) -> Path | None:
        return self.run.checkpoint

    @property
    def run_dir(self) -> Path:
        return self.run.path

    def export_spec(self) -> dict[str, Any]:
        """``{"model", "size", "kwargs"}``: what a safetensors export records to rebuild the model."""
        return {"model": self.cfg.model, "size": self.cfg.model_size, "kwargs": self.model_kwargs}

    def describe_parallel(self) -> str:
        """One line: the FSDP/compile units, the compute dtype and activation checkpointing."""
        cfg = self.cfg.parallel
        units = "one FSDP unit (the root)" if self.wrap == "model" else "an FSDP unit per block"
        compiled = ("whole-model" if self.wrap == "model" else "per-block") + " compile" if cfg.compile else "eager"
        dtype = "bf16 compute over fp32 weights" if self.parallelize_options["param_dtype"] is not None else "fp32"
        return (
            f"parallelize: --parallel.wrap {cfg.wrap} -> {self.wrap}: {units}, {compiled}; {dtype}; "
            f"activation checkpointing {cfg.activation_checkpointing}"
        )


def model_kwargs(cfg: Config) -> dict:
    """Constructor overrides for ``build_model(cfg.model, cfg.model_size, **kwargs)``: the set
    ``--arch`` options. An option the family does not take is an error naming the families that do."""
    accepted = model_arguments(get_family(cfg.model).model)
    values = {k: v for k, v in vars(cfg.arch).items() if v is not None}
    stray = sorted(set(values) - accepted)
    if stray:
        where = "; ".join(
            f"{flag('arch.' + k)} applies to {', '.join(_families_taking(k)) or 'no family'}" for k in stray
        )
        raise ValueError(
            f"--model {cfg.model} does not take {stray} ({where}); remove the option or pick another --model"
        )
    return values


def _families_taking(option: str) -> tuple[str, ...]:
    return ARCH_OPTIONS[option].families if option in ARCH_OPTIONS else ()


def validate_config(cfg: Config) -> RunPlan:
    """Every check that needs no communication, and the run resolved once (see the module doc).

    Runs on every rank before the first collective, so a bad option fails everywhere at once,
    as a :class:`~ucfvit.train.config.ConfigError` (a ValueError) naming the option. Numeric
    ranges come first (:func:`~ucfvit.train.ranges.check_ranges`), before anything is built or
    written. ``cfg`` itself is not changed: the plan holds the resolved copy.
    """
    check_ranges(cfg)
    try:
        return _resolve(cfg)
    except ConfigError:
        raise
    except ValueError as err:  # from the model constructors, mesh parsing and parallelize's checks
        raise ConfigError(str(err)) from err


def _resolve(cfg: Config) -> RunPlan:
    cfg = copy.deepcopy(cfg)
    if cfg.run.dir is None:
        cfg.run.dir = Path("runs") / cfg.model
    try:
        adapt_to_data(cfg)  # reads one file header at most
    except DataError as err:
        raise ValueError(str(err)) from err
    shape = parse_mesh(cfg.mesh, world_size())
    spec, model = build_checked_model(cfg, shape)
    inputs = input_spec(model, spec)
    try:
        check_data(cfg.data, model, spec, shape.dp_size)
        check_eval(cfg, model, spec)
        check_sinks(cfg.metrics.sink)
    except DataError as err:
        raise ValueError(str(err)) from err
    try:
        check_run_dir_outside_data(cfg.data, cfg.run.dir)
    except DataError as err:
        raise ValueError(str(err)) from err
    check_path_length(Path(cfg.run.dir), cfg.max_steps, shape.world_size)
    run = inspect_run_dir(cfg.run.dir, cfg.checkpoint.resume, cfg.run.overwrite)  # reads only
    kwargs = resolved_model_kwargs(cfg.model, cfg.model_size, model_kwargs(cfg))
    if run.checkpoint is not None:
        _check_compatible(cfg, kwargs, run.checkpoint)
    pretrained = prepare_pretrained(cfg.init, model) if run.checkpoint is None else None  # a resume has its own
    freeze_encoder(cfg.init, model)
    device_type = mesh_device_type()
    tree = tree_transform(model, cfg.data)
    return RunPlan(
        cfg=cfg,
        spec=spec,
        shape=shape,
        model=model,
        model_kwargs=kwargs,
        batch=batch_split(cfg, shape),
        device_type=device_type,
        wrap=resolve_wrap(cfg.parallel.wrap, shape.fsdp, shape.tp),
        parallelize_options=cfg.parallel.parallelize_options(device_type),
        inputs=inputs,
        tree=tree,
        run=run,
        pretrained=pretrained,
    )


def _exists(path: Path) -> bool:
    try:
        return os.path.lexists(path)
    except OSError:  # ENAMETOOLONG: certainly not there
        return False


def check_path_length(run_dir: Path, max_steps: int, world: int) -> None:
    """Refuse (ValueError naming ``--run.dir``) a run directory whose path leaves no room for the
    longest file a run writes in it (a checkpoint shard of an abandoned branch), as the file system
    under it counts (``PC_PATH_MAX``, ``PC_NAME_MAX``): such a run would fail at its first save."""
    run_dir = Path(os.path.abspath(run_dir))
    existing = next(p for p in (run_dir, *run_dir.parents) if _exists(p))
    try:
        path_max, name_max = os.pathconf(existing, "PC_PATH_MAX"), os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        return  # the file system does not say: nothing to check against
    step = f"step-{max_steps:08d}.tmp"
    shard = f"__{max(world - 1, 0)}_0.distcp"
    branch = f"{time.strftime('%Y%m%d-%H%M%S')}-resumed-at-step-{max_steps}"
    lock = f".lock.{socket.gethostname()}.{2**22}.stale"  # the largest pid Linux gives
    longest = os.path.join("abandoned", branch, step, shard)
    shown = str(run_dir) if len(str(run_dir)) <= 80 else f"{str(run_dir)[:40]}...{str(run_dir)[-30:]}"
    names = [*run_dir.relative_to(existing).parts, step, shard, branch, lock]
    too_long = next((n for n in names if len(n.encode()) > name_max), None)
    if too_long is not None:
        raise ValueError(
            f"--run.dir {shown}: a name in it ({too_long[:20]}...) has {len(too_long.encode())} bytes, more than "
            f"the {name_max} a file name may have there; choose a shorter --run.dir"
        )
    need = len(os.fsencode(run_dir)) + 1 + len(longest.encode())
    if need >= path_max:
        raise ValueError(
            f"--run.dir {shown} is too long ({len(os.fsencode(run_dir))} bytes): the run writes files such as "
            f"{longest}, whose path would need {need} bytes, and the file system allows {path_max - 1}; choose a "
            "shorter --run.dir"
        )


def batch_split(cfg: Config, shape: MeshShape) -> BatchSplit:
    """The per-rank batch of ``cfg`` on mesh ``shape`` and its micro-batches; ``ValueError`` naming
    the option when the global batch or the micro-batch does not divide."""
    global_batch, micro = cfg.data.global_batch_size, cfg.data.micro_batch_size
    if global_batch % shape.dp_size:
        raise ValueError(
            f"--data.global-batch-size={global_batch} must be divisible by the data-parallel size "
            f"ddp*fsdp={shape.dp_size} of mesh {shape}"
        )
    local = global_batch // shape.dp_size
    if micro is not None and local % micro:
        divisors = [d for d in range(1, local + 1) if local % d == 0]
        raise ValueError(
            f"--data.micro-batch-size={micro} must divide the per-rank batch {local} "
            f"(--data.global-batch-size / ddp*fsdp): choose one of {divisors}"
        )
    micro = micro or local
    return BatchSplit(local=local, micro=micro, accumulation=local // micro)


def build_checked_model(cfg: Config, shape: MeshShape) -> tuple[FamilySpec, nn.Module]:
    """The family and the model of ``cfg`` built on the meta device, after every check that depends
    only on the options and the mesh ``shape`` (batch sizes, model shape, what parallelize would
    refuse): ``ValueError`` naming the option. No data, files or communication."""
    spec = get_family(cfg.model)
    batch_split(cfg, shape)
    kwargs = model_kwargs(cfg)
    with torch.device("meta"):  # shape errors, before any collective
        try:
            model = build_model(cfg.model, cfg.model_size, **kwargs)
        except ValueError as err:
            raise ValueError(f"{cfg.model}/{cfg.model_size}: {_as_flags(str(err))}") from err
    classes = getattr(model, "num_classes", None)
    synthetic = not cfg.data.datasets and cfg.data.kind == "synthetic"
    if synthetic and classes is not None and classes < cfg.data.num_classes:
        raise ValueError(
            f"--arch.num-classes={classes} is smaller than the {cfg.data.num_classes} classes of the data "
            f"(--data.num-classes): use --arch.num-classes {cfg.data.num_classes}"
        )
    try:  # everything parallelize would refuse on this mesh, from the config alone
        check_parallelizable(model, shape.tp, **cfg.parallel.checked_options())
    except ValueError as err:
        raise ValueError(
            f"{cfg.model}/{cfg.model_size} on mesh {shape}: {err} (--arch.num-heads / --arch.decoder-num-heads, "
            "--mesh and --parallel.* set these)"
        ) from err
    return spec, model


def _as_flags(message: str) -> str:
    """A constructor's message with the model options it names spelled as the flags that set them
    (``embed_dim=60`` -> ``--arch.embed-dim=60``)."""

    def spell(match: re.Match) -> str:
        name = match.group(1)
        return f"{flag('arch.' + name)}=" if name in ARCH_OPTIONS else match.group(0)

    return re.sub(r"(?<![\w.-])([a-z][a-z0-9_]*)=", spell, message)


def _check_compatible(cfg: Config, mine: dict[str, Any], ckpt: Path) -> None:
    """Refuse a checkpoint whose model differs from this run's: the resolved constructor arguments
    ``mine`` are compared with the checkpoint's, except :data:`RUNTIME_OPTIONS`."""
    saved = read_checkpoint_config(ckpt)
    # The other way out: this run's directory holds the checkpoint (auto), or the user named it.
    fresh = "use a new --run.dir" if cfg.checkpoint.resume == "auto" else "drop --checkpoint.resume (start fresh)"
    if saved.get("model") != cfg.model:
        raise ValueError(
            f"checkpoint {ckpt} holds a {saved.get('model')!r} model, this run is --model {cfg.model}: "
            f"resume it with --model {saved.get('model')}, or {fresh}"
        )
    try:
        theirs = resolved_model_kwargs(
            cfg.model, saved.get("model_size"), {k: v for k, v in saved.get("arch", {}).items() if v is not None}
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint {ckpt}: its config.json does not describe a {cfg.model} model ({err})") from err
    differ = sorted(k for k in set(mine) | set(theirs) if k not in RUNTIME_OPTIONS and mine.get(k) != theirs.get(k))
    if differ:
        flags = {k: flag(f"arch.{k}") for k in differ}
        diffs = "; ".join(f"{flags[k]}: checkpoint {theirs.get(k)!r}, this run {mine.get(k)!r}" for k in differ)
        raise ValueError(
            f"checkpoint {ckpt} holds a different model ({diffs}); to resume it, pass the checkpoint's values "
            f"of {', '.join(flags.values())}; to train this model, {fresh}"
        )
