"""The training loop behind ``recipes/train.py``.

Order of a run: validate the config on every rank, building the model once on the meta device (no
collective yet) -> build the mesh -> parallelize -> materialise + init -> resume -> train. The
family's :class:`~ucfvit.models.FamilySpec` supplies the loss and any extra object it needs. Data
and forward randomness are keyed by (seed, step, global sample index), so a run gives the same
result on any mesh and after any resume.
"""

from __future__ import annotations

import datetime
import json
import re
import resource
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ucfvit.data.loader import TreePatches, build_loader, positions_at
from ucfvit.data.readers import DataError
from ucfvit.eval.plots import plot_run
from ucfvit.models import FamilySpec, build_model, get_family
from ucfvit.models.registry import model_arguments, resolved_model_kwargs
from ucfvit.parallel import (
    MeshShape,
    check_parallelizable,
    clip_grad_norm_,
    data_parallel_info,
    local_batch_range,
    make_mesh,
    parallelize,
    parse_mesh,
    resolve_wrap,
    sample_rng,
)  # fmt: skip
from ucfvit.parallel.mesh import world_size

from .checkpoint import Checkpointer, CheckpointError, decode_rng, encode_rng, read_checkpoint_config
from .config import ARCH_OPTIONS, Config, ConfigError
from .data_setup import channel_batches, check_data, input_spec, prepare_data
from .evaluation import Evaluator, check_eval
from .export import export_safetensors, exported_config, load_exported  # noqa: F401 (load_exported: its former home)
from .hooks import Hooks, check_sinks, make_sinks
from .init_from import Pretrained, freeze_encoder, load_into, prepare_pretrained
from .metrics import Throughput, append_jsonl, format_metrics, format_progress, peak_flops, train_flops_per_sample
from .optim import build_optimizer, lr_at, set_lr
from .ranges import check_ranges, flag
from .run_dir import RunDirPlan, RunLock, inspect_run_dir, prepare_run_dir
from .watchdog import Watchdog

__all__ = [
    "train", "accumulate_gradients", "build_checked_model", "validate_config", "model_kwargs",
    "RunPlan", "TrainResult", "TrainingDiverged",
]  # fmt: skip

# Ranks agree on a stop request (SIGTERM/SIGINT) at the next synchronisation point: every
# log step, checkpoint step, and at least every SYNC_EVERY steps.
SYNC_EVERY = 10
# Model options that change only what a forward computes, not the checkpoint's tensors: a resumed
# run may change them. Every other option of the family must match the checkpoint's.
RUNTIME_OPTIONS = {"attn_backend", "drop_path_rate", "drop_rate", "attn_drop_rate", "proj_drop_rate",
                   "pos_drop_rate", "patch_drop_rate", "mask_ratio", "norm_pix_loss"}  # fmt: skip


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became non-finite (more often than ``--optim.skip-nonfinite``
    allows); raised on every rank at once, before anything non-finite is saved."""


@dataclass
class TrainResult:
    """What :func:`train` returns: the parallelized model and how far the run got."""

    model: nn.Module
    steps_done: int
    stopped_early: bool
    last_loss: float | None
    run_dir: Path


@dataclass
class RunPlan:
    """What :func:`validate_config` resolves once: the family, the mesh shape, the model (on the
    meta device, not yet parallelized) and what the run does with its directory (the checkpoint
    to resume from, an abandoned branch to move aside)."""

    spec: FamilySpec
    shape: MeshShape
    model: nn.Module
    run: RunDirPlan
    pretrained: Pretrained | None = None

    @property
    def checkpoint(self) -> Path | None:
        return self.run.checkpoint

    @property
    def run_dir(self) -> Path:
        return self.run.path


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
    """Every check that needs no communication, and the model built once on the meta device.

    Runs on every rank before the first collective, so a bad option fails everywhere at once,
    as a :class:`~ucfvit.train.config.ConfigError` (a ValueError) naming the option. Numeric
    ranges come first (:func:`~ucfvit.train.ranges.check_ranges`), before anything is built or
    written.
    """
    check_ranges(cfg)
    try:
        return _resolve(cfg)
    except ConfigError:
        raise
    except ValueError as err:  # from the model constructors, mesh parsing and parallelize's checks
        raise ConfigError(str(err)) from err


def _resolve(cfg: Config) -> RunPlan:
    shape = parse_mesh(cfg.mesh, world_size())
    spec, model = build_checked_model(cfg, shape)
    try:
        check_data(cfg.data, model, spec, shape.dp_size)
        check_eval(cfg, model, spec)
        check_sinks(cfg.metrics.sink)
    except DataError as err:
        raise ValueError(str(err)) from err
    run = inspect_run_dir(cfg.run.dir, cfg.checkpoint.resume, cfg.run.overwrite)  # reads only
    if run.checkpoint is not None:
        _check_compatible(cfg, run.checkpoint)
    pretrained = prepare_pretrained(cfg.init, model) if run.checkpoint is None else None  # a resume has its own
    freeze_encoder(cfg.init, model)
    return RunPlan(spec=spec, shape=shape, model=model, run=run, pretrained=pretrained)


def build_checked_model(cfg: Config, shape: MeshShape) -> tuple[FamilySpec, nn.Module]:
    """The family and the model of ``cfg`` built on the meta device, after every check that depends
    only on the options and the mesh ``shape`` (batch sizes, model shape, what parallelize would
    refuse): ``ValueError`` naming the option. No data, files or communication."""
    spec = get_family(cfg.model)
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


def _check_compatible(cfg: Config, ckpt: Path) -> None:
    """Refuse a checkpoint whose model differs from this run's: the resolved constructor arguments
    (family defaults <- size preset <- ``--arch``) are compared, except :data:`RUNTIME_OPTIONS`."""
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
    mine = exported_config(cfg)["kwargs"]
    differ = sorted(k for k in set(mine) | set(theirs) if k not in RUNTIME_OPTIONS and mine.get(k) != theirs.get(k))
    if differ:
        flags = {k: flag(f"arch.{k}") for k in differ}
        diffs = "; ".join(f"{flags[k]}: checkpoint {theirs.get(k)!r}, this run {mine.get(k)!r}" for k in differ)
        raise ValueError(
            f"checkpoint {ckpt} holds a different model ({diffs}); to resume it, pass the checkpoint's values "
            f"of {', '.join(flags.values())}; to train this model, {fresh}"
        )


class _StopFlag:
    """Set by SIGTERM (SLURM preemption) or SIGINT (Ctrl-C); checked collectively."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


_DIVERGED_HINT = "Lower --optim.lr, keep --optim.grad-clip on, or skip such steps with --optim.skip-nonfinite N"


class _FiniteGuard:
    """Catches a non-finite loss or gradient norm. With ``allowed`` = 0 (default) the non-finite
    steps are counted on the device and the run stops at the next sync point (no extra host sync);
    with ``allowed`` > 0 every step is checked on the host (one small all-reduce) and a
    non-finite one is skipped (no optimizer update), at most ``allowed`` times."""

    def __init__(self, allowed: int, start_step: int, device: torch.device):
        self.allowed, self.skipped, self.synced = allowed, 0, start_step
        self.nonfinite = torch.zeros((), device=device)

    def update_ok(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, last_saved: Path | None) -> bool:
        """Whether to apply the optimizer update of ``step`` (1-based)."""
        bad = (~(torch.isfinite(loss) & torch.isfinite(grad_norm.to(loss.device)))).float()
        if self.allowed == 0:
            self.nonfinite += bad
            return True
        dist.all_reduce(bad)  # non-finite on any rank
        if bad.item() == 0:
            return True
        self.skipped += 1
        if self.skipped > self.allowed:
            raise TrainingDiverged(
                f"step {step}: {self.skipped} steps with a non-finite loss or gradient norm, more than "
                f"--optim.skip-nonfinite={self.allowed} allows; stopping without saving (the last checkpoint, "
                f"{last_saved or 'none'}, is kept). Lower --optim.lr or keep --optim.grad-clip on"
            )
        if dist.get_rank() == 0:
            print(f"step {step}: non-finite loss or gradient norm, update skipped ({self.skipped} of "
                  f"--optim.skip-nonfinite={self.allowed})", flush=True)  # fmt: skip
        return False

    def check_synced(self, step: int, nonfinite: float, last_saved: Path | None) -> None:
        """At a sync point: stop if any step since the previous one was non-finite (every rank agrees)."""
        if nonfinite > 0:
            when = f"at step {step}" if step == self.synced + 1 else f"between step {self.synced + 1} and step {step}"
            raise TrainingDiverged(
                f"the loss or gradient norm became non-finite {when}; "
                f"stopping without saving (the last checkpoint, {last_saved or 'none'}, is kept). {_DIVERGED_HINT}"
            )
        self.synced = step


def _parameters_finite(model: nn.Module) -> bool:
    """Whether every parameter shard on every rank is finite (collective)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    ok = torch.stack([torch.isfinite(t).all() for t in local]).all().float() if local else torch.ones(())
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def _start_positions(state: dict, names: list[str], rank: int) -> list[int]:
    """The datasets' stream positions saved in a checkpoint (a dataset new to this run starts at 0;
    a checkpoint of one dataset written before per-dataset positions holds ``data_offset``)."""
    saved = state.get("data_positions")
    if saved is None:
        saved = {names[0]: state.get("data_offset", 0)} if len(names) == 1 else {}
    if not isinstance(saved, dict) or not all(isinstance(v, int) and v >= 0 for v in saved.values()):
        raise CheckpointError(f"the checkpoint's data positions {saved!r} are not non-negative integers per dataset")
    new = [n for n in names if n not in saved]
    if new and rank == 0:
        print(f"datasets {', '.join(new)} are new since the checkpoint: they start at their first sample", flush=True)
    return [saved.get(n, 0) for n in names]


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (host RSS)


def _describe_parallel(cfg: Config, shape: MeshShape, device_type: str) -> str:
    """One line: the FSDP/compile units parallelize uses, the compute dtype and activation checkpointing."""
    options = cfg.parallel.parallelize_options(device_type)
    wrap = resolve_wrap(cfg.parallel.wrap, shape.fsdp, shape.tp)
    units = "one FSDP unit (the root)" if wrap == "model" else "an FSDP unit per block"
    compiled = ("whole-model" if wrap == "model" else "per-block") + " compile" if cfg.parallel.compile else "eager"
    dtype = "bf16 compute over fp32 weights" if options["param_dtype"] is not None else "fp32"
    return (
        f"parallelize: --parallel.wrap {cfg.parallel.wrap} -> {wrap}: {units}, {compiled}; {dtype}; "
        f"activation checkpointing {cfg.parallel.activation_checkpointing}"
    )


def _validate(evaluator: Evaluator, step: int, run_dir: Path, rank: int) -> dict:
    """Run validation (collective); rank 0 prints it and appends it to metrics.jsonl."""
    metrics = evaluator.run()
    if rank == 0:
        print(f"validation at step {step}: {format_metrics(metrics)}", flush=True)
        append_jsonl(run_dir / "metrics.jsonl", {"step": step, "eval": metrics, "time": time.time()})
    return metrics


def _plot_curves(run_dir: Path) -> None:
    """``<run_dir>/curves.png`` from metrics.jsonl, when matplotlib is installed (rank 0)."""
    try:
        print(f"curves {plot_run(run_dir)}", flush=True)
    except ImportError as err:
        print(f"no curves.png: {err}", flush=True)


def train(cfg: Config, hooks: Sequence[Hooks] = ()) -> TrainResult:
    """Run (or resume) the training described by ``cfg``; see the module doc. ``hooks``
    (:class:`~ucfvit.train.hooks.Hooks`) are called at logged steps, validations and checkpoints."""
    plan = validate_config(cfg)
    try:
        lock = RunLock(plan.run_dir).acquire()  # every rank; refuses before any collective
    except ValueError as err:
        raise ConfigError(str(err)) from err
    try:
        with Watchdog(cfg.run.collective_timeout) as watchdog:  # ends a rank that stops making progress
            return _train(cfg, plan, lock, watchdog, list(hooks))
    finally:
        if not dist.is_initialized() or dist.get_rank() == 0:
            lock.release()


def accumulate_gradients(
    model: nn.Module,
    spec: FamilySpec,
    batches: Iterator[dict],
    mesh: DeviceMesh,
    cfg: Config,
    step: int,
    accum: int,
    micro: int,
    extra: Any,
    device: torch.device,
) -> torch.Tensor:
    """Forward and backward of one training step: ``accum`` micro-batches of ``micro`` samples from
    ``batches``, each loss scaled by ``1/accum``; gradients are reduced once, on the last backward.
    A single-channel model trains on each channel of a batch in turn. Returns the step's loss (the
    sum of the scaled losses, detached). ``benchmarks/simulate.py`` traces this same function."""
    single = getattr(model, "single_channel", False)
    loss_sum = torch.zeros((), device=device)
    for m in range(accum):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        rng = sample_rng(mesh, cfg.run.seed, step, cfg.data.global_batch_size, micro_start=m * micro)
        parts = channel_batches(batch, model.variables, cfg.data.separate_channels) if single else [batch]
        for i, part in enumerate(parts):
            if accum * len(parts) > 1:
                model.set_requires_gradient_sync(m == accum - 1 and i == len(parts) - 1)
            loss = spec.loss(model, part, rng, extra) / (accum * len(parts))
            loss.backward()
            loss_sum += loss.detach()
    return loss_sum


def _train(cfg: Config, plan: RunPlan, lock: RunLock, watchdog: Watchdog, hooks: list[Hooks]) -> TrainResult:
    ckpt, model = plan.checkpoint, plan.model
    mesh = make_mesh(plan.shape, timeout=datetime.timedelta(seconds=cfg.run.collective_timeout))
    rank = dist.get_rank()
    device_type = mesh.device_type
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    run_dir = plan.run_dir
    dist.barrier()  # every rank has inspected the run directory before rank 0 changes it
    if rank == 0:
        lock.start_heartbeat()
        prepare_run_dir(plan.run, cfg.to_dict())
        print(f"ucfvit: {cfg.model}/{cfg.model_size} on mesh {cfg.mesh} ({device_type}), run dir {run_dir}", flush=True)
        print(_describe_parallel(cfg, plan.shape, device_type), flush=True)
        print(json.dumps(cfg.to_dict(), indent=2), flush=True)
        print(plan.run.describe(), flush=True)
    dist.barrier()
    dp_rank, dp_size = data_parallel_info(mesh)
    watchdog.progress(None, "data index")
    data = prepare_data(cfg.data, input_spec(model, plan.spec), dp_size, cfg.run.seed, run_dir, rank)

    parallelize(model, mesh, **cfg.parallel.parallelize_options(device_type))
    model.to_empty(device=device)
    torch.manual_seed(cfg.run.seed)
    model.init_weights()
    if plan.pretrained is not None:
        load_into(model, plan.pretrained)
        if rank == 0:
            print(plan.pretrained.describe(), flush=True)
        plan.pretrained = None  # the full tensors are no longer needed
    model.train()
    optimizer = build_optimizer(model, cfg, device_type)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint.keep)

    start_step, start = 0, [0] * len(data.sources)
    if ckpt is not None:
        watchdog.progress(None, "checkpoint load")
        state = checkpointer.load(ckpt, model, optimizer)
        start_step, start = state["step"], _start_positions(state, data.plan.names, rank)
        decode_rng(state["rng"])
        if rank == 0:
            where = dict(zip(data.plan.names, start, strict=True))
            print(f"resumed from {ckpt} at step {start_step} (data positions {where})", flush=True)

    extra = plan.spec.build_extra(model)
    evaluator = None
    if cfg.eval.every > 0:
        watchdog.progress(None, "validation data index")
        evaluator = Evaluator(model, plan.spec, input_spec(model, plan.spec), mesh, cfg, run_dir, extra)
    global_batch = cfg.data.global_batch_size
    rows = local_batch_range(mesh, global_batch)
    micro = cfg.data.micro_batch_size or len(rows)
    accum = len(rows) // micro
    tree = getattr(model, "adaptive_patching", False) and cfg.data.patching == "tree"
    loader = build_loader(
        data.sources, data.plan, dp_rank, start, start_step, cfg.max_steps, micro, cfg.run.seed,
        shuffle=cfg.data.shuffle,
        transform=TreePatches(model.patch_size, model.fixed_length, cfg.data.min_patch, cfg.data.edge_thresholds,
                              cfg.data.separate_channels) if tree else None,
        num_workers=cfg.data.num_workers, prefetch_factor=cfg.data.prefetch_factor,
        pin_memory=device_type == "cuda",
    )  # fmt: skip
    batches = iter(loader)
    flops_per_step = train_flops_per_sample(model, pooled_head=plan.spec.pooled_head) * global_batch
    peak = peak_flops(device)
    world = dist.get_world_size()

    def data_positions(step: int) -> dict[str, int]:
        """Each dataset's stream position at ``step``: continues from the checkpoint's, so the sample
        stream is the same on any mesh (and never repeats if the batch size changes)."""
        return dict(zip(data.plan.names, positions_at(data.plan, start, start_step, step), strict=True))

    def save(step: int) -> None:
        watchdog.progress(step, "checkpoint save")
        if not _parameters_finite(model):
            raise TrainingDiverged(
                f"step {step}: the parameters are not finite; not saving (the last checkpoint, "
                f"{checkpointer.last_saved or 'none'}, is kept). {_DIVERGED_HINT}"
            )
        state = {"step": step, "data_positions": data_positions(step), "lr": lr_at(step, cfg), "rng": encode_rng()}
        path = checkpointer.save(step, model, optimizer, state, cfg.to_dict())
        if rank == 0:
            print(f"checkpoint {path}", flush=True)
        for hook in hooks:
            hook.on_checkpoint(step, path)

    if rank == 0:
        hooks = hooks + make_sinks(cfg.metrics.sink, run_dir, cfg.to_dict())
    stop = _StopFlag()
    guard = _FiniteGuard(cfg.optim.skip_nonfinite, start_step, device)
    timer = Throughput(start_step)
    last_loss, stopped, done = None, False, start_step
    try:
        for step in range(start_step, cfg.max_steps):
            watchdog.progress(step + 1, "training step")  # numbered as in the logs: step N ends with N done
            lr = lr_at(step, cfg)
            set_lr(optimizer, lr)
            loss_sum = accumulate_gradients(model, plan.spec, batches, mesh, cfg, step, accum, micro, extra, device)
            grad_norm = clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
            if guard.update_ok(step + 1, loss_sum, grad_norm, checkpointer.last_saved):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            log_now = done % cfg.metrics.log_every == 0 or done == cfg.max_steps
            ckpt_now = cfg.checkpoint.every > 0 and done % cfg.checkpoint.every == 0
            eval_now = evaluator is not None and (done % cfg.eval.every == 0 or done == cfg.max_steps)
            if not (log_now or ckpt_now or eval_now or done % SYNC_EVERY == 0):
                continue  # no host sync on this step
            # One all-reduce carries the loss (mean over ranks = mean over data-parallel ranks),
            # the stop flag (any rank asked to stop) and the non-finite steps since the last sync.
            stop_flag = torch.tensor(float(stop.requested), device=device)
            stats = torch.stack([loss_sum.float(), stop_flag, guard.nonfinite])
            dist.all_reduce(stats)
            last_loss = stats[0].item() / world
            stop_now = stats[1].item() > 0
            if log_now:
                interval, overall = timer.update(done)
                tflops = flops_per_step / interval / 1e12
                record = {
                    "step": done, "max_steps": cfg.max_steps, "loss": last_loss, "lr": lr,
                    "grad_norm": float(grad_norm), "images_per_s": global_batch / interval,
                    "tokens_per_s": global_batch * model.num_patches / interval, "tflops": tflops,
                    "mfu": None if peak is None else tflops * 1e12 / (peak * world),
                    "peak_mem_gib": _peak_memory_gib(device), "eta_s": overall * (cfg.max_steps - done),
                    "time": time.time(),
                }  # fmt: skip
                if rank == 0:
                    print(format_progress(record), flush=True)
                    append_jsonl(run_dir / "metrics.jsonl", record)
                stop.requested |= any([bool(hook.on_step_end(done, record)) for hook in hooks])
            guard.check_synced(done, stats[2].item(), checkpointer.last_saved)
            if eval_now:
                watchdog.progress(done, "validation")
                metrics = _validate(evaluator, done, run_dir, rank)
                stop.requested |= any([bool(hook.on_eval_end(done, metrics)) for hook in hooks])
            if ckpt_now or stop_now:
                save(done)
            if stop_now:
                stopped = True
                if rank == 0:
                    print(f"stop requested: saved step {done}, exiting", flush=True)
                break
        if start_step >= cfg.max_steps and rank == 0:
            print(
                f"nothing to train: {ckpt} is at step {start_step}, so --max-steps {cfg.max_steps} is already "
                "reached (raise --max-steps to train longer)",
                flush=True,
            )
        if not stopped:
            if done > start_step and not (cfg.checkpoint.every > 0 and cfg.max_steps % cfg.checkpoint.every == 0):
                save(cfg.max_steps)
            if cfg.checkpoint.export_safetensors:
                watchdog.progress(cfg.max_steps, "safetensors export")
                export_safetensors(model, cfg, run_dir)
            if evaluator is not None and done > start_step:
                watchdog.progress(cfg.max_steps, "pictures")
                path = evaluator.pictures(run_dir / "pictures", f"{cfg.model}_step{done}")
                if path is not None:
                    print(f"pictures {path}", flush=True)
                    for hook in hooks:
                        hook.on_pictures(done, path)
        if rank == 0 and done > start_step:
            _plot_curves(run_dir)
    finally:
        stop.restore()
        for hook in hooks:
            hook.close()
    return TrainResult(model, steps_done=done, stopped_early=stopped, last_loss=last_loss, run_dir=run_dir)
