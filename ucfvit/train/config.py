"""Everything a training run needs, as typed dataclasses (parsed from the command line by tyro).

Top-level fields pick the recipe (``model``, ``model_size``), the mesh and the length; groups hold
the rest. Every field has a default, documented by its docstring (shown by ``--help``). The model
options (``arch``) are generated from the registered families' constructors
(:mod:`ucfvit.train.model_options`). A saved ``config.json`` loads back with :func:`load_config`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import tyro

from ucfvit.data.config import DataConfig, DatasetConfig
from ucfvit.files import MAX_DEPTH, MIB, check_depth, read_bounded
from ucfvit.models import FAMILIES, SIZES

from .model_options import collect_options, make_arch_config

__all__ = [
    "ARCH_OPTIONS",
    "ArchConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DatasetConfig",
    "config_from_dict",
    "dotted_options",
    "load_config",
    "read_config_file",
]


class ConfigError(ValueError):
    """A bad training option or config file; the message names the option and the fix.
    ``recipes/train.py`` prints it as one line instead of a traceback."""


CONFIG_LIMIT = MIB  # the largest --config file read (a saved config.json takes a few KiB)
ARCH_OPTIONS = collect_options(FAMILIES.values())
ArchConfig = make_arch_config(ARCH_OPTIONS)


@dataclass
class OptimConfig:
    """AdamW."""

    lr: float = 1e-3
    """Peak learning rate (before ``lr_scaling``)."""
    lr_scaling: Literal["none", "linear"] = "none"
    """``linear``: lr = lr * global_batch_size / 256."""
    weight_decay: float = 0.05
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""
    layer_decay: float = 1.0
    """Layer-wise learning-rate decay (BEiT, MAE fine-tuning): encoder block i of depth L trains at
    lr * layer_decay**(L - i), the embeddings at lr * layer_decay**(L + 1), everything after the blocks
    (final norm, head, decoders) at lr. 1: off."""
    skip_nonfinite: int = 0
    """Skip a step whose loss or gradient norm is not finite, at most N times in the run, then stop
    (0: stop at the first; costs one host sync per step when N > 0)."""


@dataclass
class ScheduleConfig:
    """Linear warm-up from ``warmup_start_lr`` then cosine decay to ``min_lr`` at ``max_steps``."""

    warmup_steps: int = 10
    """Steps of linear warm-up."""
    warmup_start_lr: float = 0.0
    """Learning rate at step 0."""
    min_lr: float = 0.0
    """Learning rate at the last step."""


@dataclass
class InitConfig:
    """Start from pretrained weights (fine-tuning); ignored when the run resumes from its own checkpoint."""

    from_: Annotated[str | None, tyro.conf.arg(name="from")] = None
    """PATH of the weights: a ucfvit run directory or ``step-N`` checkpoint (any mesh), a ``.safetensors``
    export, a timm ViT state dict or an MAE reference checkpoint (``.pth``); told apart by their keys, and
    read without unpickling code."""
    parts: Literal["encoder", "all"] = "encoder"
    """``encoder``: patch embedding, class token, positions, blocks and final norm (an MAE into a ViT, UNETR
    or SAP); ``all``: every entry whose name and shape fit (e.g. the same family at another image size)."""
    freeze_encoder: bool = False
    """Train only what follows the encoder (linear probing: the head; UNETR: its decoder); needs ``--init.from``."""


@dataclass
class EvalConfig:
    """Validation on held-out data: during training (``--eval.every``) and by ``recipes/evaluate.py``."""

    every: int = 0
    """Validate every N steps and after the last one (0: never during training)."""
    samples: int = 64
    """Validation samples per dataset (a file dataset: at most its tiles in ``--eval.split``, evenly spread)."""
    batch_size: int = 8
    """Samples per rank per forward."""
    split: tuple[float, float] | None = None
    """Fractions [start, end) of each directory's files to validate on (None: what ``--data.split`` leaves
    out of training, e.g. 0.9 1 after ``--data.split 0 0.9``). Synthetic data validates on samples that
    training never draws."""
    image_size: tuple[int, ...] | None = None
    """Synthetic data: validate on images of this size, larger than the model's input, by sliding-window
    inference (segmentation families); None: the model's input size."""
    pictures: int = 8
    """Samples drawn in the PNG pictures written to ``<run.dir>/pictures`` after the last validation (0: none)."""
    sampler: Literal["ddim", "ddpm", "none"] = "ddim"
    """Diffusion: deterministic DDIM with ``--eval.sample-steps``, DDPM ancestral over all steps, or no sampling."""
    sample_steps: int = 50
    """Diffusion: DDIM steps (at most ``--arch.time-steps``)."""
    window_overlap: float = 0.5
    """Sliding-window inference: fraction of a tile shared with its neighbour."""
    window_weights: Literal["gaussian", "uniform"] = "gaussian"
    """Sliding-window inference: how overlapping tiles are blended."""


@dataclass
class ParallelConfig:
    """How the model is parallelized over the mesh (see ``ucfvit.parallelize``)."""

    param_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype of parameters over fp32 master weights (``auto``: bf16 on GPUs, fp32 on CPU)."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute activations per block in backward."""
    compile: bool = False
    """torch.compile the model (each block, or the whole forward: see ``--parallel.wrap``); on in the GPU recipes."""
    wrap: Literal["auto", "model", "blocks"] = "auto"
    """Units of FSDP and compile: ``blocks`` (one per block: all-gathers overlap compute, one block gathered at a
    time) or ``model`` (the root only: one whole-model graph, one copy-in of bf16 weights, but every parameter
    gathered at once and gradients reduced after backward); ``auto``: ``model`` when fsdp = tp = 1, else ``blocks``."""
    sequence_parallel: bool = False
    """Megatron-style sequence parallelism (tp > 1): the residual stream between blocks, norms and residual adds
    stay split along tokens over tp; attention and MLP gather their input and reduce-scatter their output."""
    reshard_after_forward: bool = True
    """Free gathered parameters of inner blocks after forward."""

    def checked_options(self) -> dict[str, Any]:
        """The keyword arguments of ``ucfvit.parallel.check_parallelizable`` (``parallelize`` takes them too)."""
        return {
            "sequence_parallel": self.sequence_parallel,
            "activation_checkpointing": self.activation_checkpointing,
            "compile": self.compile,
            "wrap": self.wrap,
        }

    def parallelize_options(self, device_type: str) -> dict[str, Any]:
        """The keyword arguments of ``ucfvit.parallelize`` for a run on ``device_type`` (``param_dtype``
        ``auto``: bf16 on GPUs, the fp32 master weights on CPU)."""
        bf16 = self.param_dtype == "bfloat16" or (self.param_dtype == "auto" and device_type == "cuda")
        return {
            **self.checked_options(),
            "param_dtype": torch.bfloat16 if bf16 else None,
            "reshard_after_forward": self.reshard_after_forward,
        }


@dataclass
class CheckpointConfig:
    """Distributed checkpoints in ``<run.dir>/checkpoints``."""

    every: int = 0
    """Save every N steps (0: only at the end)."""
    keep: int = 2
    """Complete checkpoints to keep (oldest removed first)."""
    resume: str = "auto"
    """``auto``: continue from the newest complete checkpoint of ``--run.dir`` (start fresh if it holds
    none); ``none``: start fresh (refused if ``--run.dir`` already holds a run); or a checkpoint PATH
    (``step-N`` or a run directory). Resuming an older step of this run moves its later steps aside."""
    export_safetensors: bool = False
    """At the end, write a consolidated ``model.safetensors`` (+ ``model_config.json``) to the run directory."""


@dataclass
class MetricsConfig:
    """Progress output."""

    log_every: int = 10
    """Print a progress line (and a JSON line to metrics.jsonl) every N steps."""
    sink: tuple[Literal["tensorboard", "wandb"], ...] = ()
    """Also log to TensorBoard (``<run.dir>/tensorboard``) and/or Weights & Biases (offline unless ``WANDB_MODE``
    is set), scalars and pictures; metrics.jsonl is always written."""


@dataclass
class RunConfig:
    """Where and how reproducibly the run happens."""

    dir: Path | None = None
    """Run directory: config.json, metrics.jsonl, checkpoints/ and exports (None: ``runs/<model>``)."""
    seed: int = 0
    """Seed of initialisation, data and forward randomness."""
    overwrite: bool = False
    """Start over in a ``--run.dir`` that holds a run: delete its checkpoints, metrics and export first."""
    collective_timeout: float = 1800.0
    """Seconds without progress (a step, a checkpoint save or load; also every collective's timeout) before a
    rank exits naming the step; torchrun then ends the job, a hung worker after its 30 s grace: within ~this+30 s."""


@dataclass
class Config:
    """A ucfvit training run."""

    model: str = "mae"
    """Model family (picks the recipe): one of ucfvit.models.list_models()."""
    model_size: Literal[tuple(SIZES)] = "debug"  # type: ignore[valid-type]
    """Size preset (see ucfvit.models.SIZES)."""
    mesh: str = "1x1x1"
    """ddp x fsdp x tp; the product must equal the number of processes."""
    max_steps: int = 60
    """Optimizer steps."""
    verbose: bool = False
    """Print the full resolved config, the data plan and the ``--init.from`` report at the start (they are
    always written to the run directory: config.json, data/plan.json, init_report.txt)."""
    arch: ArchConfig = field(default_factory=ArchConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    init: InitConfig = field(default_factory=InitConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        return config_from_dict(cls, data)


def config_from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a JSON-style dict (lists become tuples, nested dicts nested
    dataclasses). Unknown keys are an error that names them; missing keys keep their defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"field {where.rstrip('.') or '(top level)'}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"config has unknown field(s) {[where + k for k in unknown]}; known: {[where + k for k in known]}"
        )
    hints = typing.get_type_hints(cls, include_extras=False)
    values = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = config_from_dict(kind, value, f"{where}{name}.")
        elif typing.get_origin(kind) is dict and dataclasses.is_dataclass(typing.get_args(kind)[1]):
            if not isinstance(value, dict):
                raise ConfigError(f"field {where}{name}: expected a mapping of names to groups, got {value!r}")
            item = typing.get_args(kind)[1]
            values[name] = {str(k): config_from_dict(item, v, f"{where}{name}.{k}.") for k, v in value.items()}
        elif isinstance(value, str) and (kind is Path or Path in typing.get_args(kind)):
            values[name] = Path(value)
        else:
            value = tuple(value) if isinstance(value, list) else value
            if not _matches(value, kind):
                raise ConfigError(f"field {where}{name}: {value!r} is not of type {_type_name(kind)}")
            values[name] = value
    return cls(**values)


def _matches(value: Any, kind: Any) -> bool:
    """Whether a JSON-loaded ``value`` fits the field type ``kind`` (scalars, Literals, Optionals, tuples)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return True
    if origin is Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        return len(items) == len(value) and all(map(_matches, value, items))
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind) if isinstance(kind, type) else True


def _type_name(kind: Any) -> str:
    return str(kind).replace("typing.", "") if not isinstance(kind, type) else kind.__name__


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a config file: ``config.json`` (or ``.yaml``/``.yml`` when PyYAML is installed).

    Data only: JSON/YAML safe loading, never code. The file must be a regular file (a FIFO would
    block) of at most :data:`CONFIG_LIMIT` bytes, nested at most :data:`~ucfvit.files.MAX_DEPTH`
    deep; YAML anchors and aliases are refused (a few hundred bytes of nested aliases expand to
    gigabytes in whatever walks the result)."""
    path = Path(path)
    raw = read_bounded(path, CONFIG_LIMIT, "--config file", ConfigError)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config {path}: not a text file (byte {err.start} is not UTF-8)") from err
    try:
        data = _read_yaml(path, text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except RecursionError:
        raise ConfigError(f"--config {path}: nested too deeply to be read") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"--config {path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of options, got {type(data).__name__}")
    return check_depth(data, f"--config {path}", "it", ConfigError)


def _read_yaml(path: Path, text: str) -> Any:
    try:
        import yaml
    except ImportError as err:
        raise ConfigError(f"--config {path}: YAML needs PyYAML (pip install pyyaml), or pass a .json file") from err
    # One pass over the parser's events first: it stops at the first alias, or where the nesting passes
    # MAX_DEPTH (PyYAML's scanner slows down with the depth, and its composer recurses).
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if getattr(event, "anchor", None) is not None:  # &name, or *name (an AliasEvent)
                raise ConfigError(
                    f"--config {path}: YAML aliases are not supported in a config ('{event.anchor}' at line "
                    f"{event.start_mark.line + 1}); write each value out"
                )
            if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise ConfigError(f"--config {path}: nested too deeply to be read (more than {MAX_DEPTH} levels)")
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                depth -= 1
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path}: not valid YAML ({' '.join(str(err).split())})") from err


def _overlay(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, option groups merged key by key (named dataset groups are replaced whole)."""
    out = dict(base)
    for key, value in over.items():
        merge = isinstance(value, dict) and isinstance(out.get(key), dict) and key != "datasets"
        out[key] = _overlay(out[key], value) if merge else value
    return out


def load_config(path: str | Path, base: Config | None = None) -> Config:
    """A :class:`Config` from a config file (see :func:`read_config_file`): a saved ``config.json``,
    or a partial file (e.g. only ``data.datasets``) whose options go on top of ``base`` (a recipe;
    None: the dataclass defaults)."""
    data = read_config_file(path)
    try:
        return Config.from_dict(data if base is None else _overlay(base.to_dict(), data))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--config {path}: {err}") from err


def dotted_options(data: dict[str, Any], prefix: str = "") -> set[str]:
    """The options a config mapping sets, dotted (``{"arch": {"img_size": ..}}`` -> ``arch.img_size``)."""
    out = set()
    for key, value in data.items():
        nested = isinstance(value, dict) and key != "datasets"
        out |= dotted_options(value, f"{prefix}{key}.") if nested else {prefix + key}
    return out
