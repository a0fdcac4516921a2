"""The training loop behind ``recipes/train.py``.

Order of a run: :func:`~ucfvit.train.plan.validate_config` resolves the run on every rank (no
collective yet) -> the run directory is locked and inspected again (the plan that writes is made
under the lock) -> the mesh is built -> the model parallelized, materialised and initialised ->
resumed -> trained. Every derived value (batch split, wrap, dtypes, input spec, adaptive-patch
transform) is read from the :class:`~ucfvit.train.plan.RunPlan`.
Data and forward randomness are keyed by (seed, step, global sample index), so a run gives the
same result on any mesh and after any resume.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import resource
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ucfvit.data.loader import build_loader, close_workers, dead_worker_error, positions_at
from ucfvit.eval.plots import plot_run
from ucfvit.models import FamilySpec
from ucfvit.parallel import clip_grad_norm_, data_parallel_info, make_mesh, parallelize, sample_rng

from .checkpoint import Checkpointer, CheckpointError, check_trainer_state, decode_rng, encode_rng
from .config import Config, ConfigError
from .data_setup import channel_batches, prepare_data
from .export import export_safetensors
from .guards import DIVERGED_HINT, FiniteGuard, StopFlag, TrainingDiverged, launched_by_torchrun, parameters_finite
from .hooks import Hooks, make_sinks
from .init_from import load_into
from .optim import build_optimizer, lr_at, set_lr
from .plan import RunPlan, validate_config
from .run_dir import RunLock, prepare_run_dir, recheck_run_dir
from .throughput import Throughput, append_jsonl, format_metrics, format_progress, peak_flops, train_flops_per_sample
from .validation import Validator
from .watchdog import Watchdog

__all__ = ["INIT_REPORT", "TrainResult", "accumulate_gradients", "train"]

# Ranks agree on a stop request (SIGTERM/SIGINT/SIGHUP, or torchrun gone) at the next synchronisation point: every
# log step, checkpoint step, and at least every SYNC_EVERY steps.
SYNC_EVERY = 10
INIT_REPORT = "init_report.txt"
"""What ``--init.from`` loaded, skipped and left fresh, written to the run directory."""


@dataclass
class TrainResult:
    """What :func:`train` returns: the parallelized model and how far the run got."""

    model: nn.Module
    steps_done: int
    stopped_early: bool
    last_loss: float | None
    run_dir: Path


def train(cfg: Config, hooks: Sequence[Hooks] = ()) -> TrainResult:
    """Run (or resume) the training described by ``cfg``; see the module doc. ``hooks``
    (:class:`~ucfvit.train.hooks.Hooks`) are called at logged steps, validations and checkpoints."""
    with _warnings_on_rank0():
        plan = validate_config(cfg)
        try:
            lock = RunLock(plan.run_dir).acquire()  # every rank; refuses before any collective
        except ValueError as err:
            raise ConfigError(str(err)) from err
        try:
            try:  # the plan that writes is made under the lock: the directory may have changed since
                plan.run = recheck_run_dir(plan.run, plan.cfg.checkpoint.resume, plan.cfg.run.overwrite)
            except ValueError as err:
                raise ConfigError(str(err)) from err
            with Watchdog(plan.cfg.run.collective_timeout) as watchdog:  # ends a rank that stops making progress
                return _train(plan, lock, watchdog, list(hooks))
        finally:
            if not dist.is_initialized() or dist.get_rank() == 0:
                lock.release()


@contextlib.contextmanager
def _warnings_on_rank0() -> Iterator[None]:
    """Python warnings are printed by rank 0 only: every rank of a job raises the same ones."""
    with warnings.catch_warnings():
        if int(os.environ.get("RANK", "0")) != 0:
            warnings.simplefilter("ignore")
        yield


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


def _start_positions(state: dict, names: list[str], rank: int) -> list[int]:
    """The datasets' stream positions saved in a checkpoint (a dataset new to this run starts at 0)."""
    saved = state.get("data_positions")
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


def _validate(validator: Validator, step: int, run_dir: Path, rank: int) -> dict:
    """Run validation (collective); rank 0 prints it and appends it to metrics.jsonl."""
    metrics = validator.run()
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


def _say(verbose: bool, *lines: str) -> None:
    """Rank 0's start-of-run lines; those after the first only with ``--verbose``."""
    print("\n".join(lines if verbose else lines[:1]), flush=True)


def _train(plan: RunPlan, lock: RunLock, watchdog: Watchdog, hooks: list[Hooks]) -> TrainResult:
    cfg, ckpt, model, run_dir = plan.cfg, plan.checkpoint, plan.model, plan.run_dir
    mesh = make_mesh(
        plan.shape, device_type=plan.device_type, timeout=datetime.timedelta(seconds=cfg.run.collective_timeout)
    )
    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if plan.device_type == "cuda" else torch.device("cpu")
    dist.barrier()  # every rank has inspected the run directory before rank 0 changes it
    refusal = None
    if rank == 0:
        lock.start_heartbeat()
        try:
            prepare_run_dir(plan.run, cfg.to_dict())
        except ValueError as err:  # a link out of the run dir that appeared since the inspection
            refusal = str(err)
        else:
            print(
                f"ucfvit: {cfg.model}/{cfg.model_size} on mesh {cfg.mesh} ({plan.device_type}), {plan.run.describe()}",
                flush=True,
            )
            _say(cfg.verbose, plan.describe_parallel(), json.dumps(cfg.to_dict(), indent=2))
    box = [refusal]
    dist.broadcast_object_list(box, src=0)  # also the barrier: rank 0 has prepared the directory
    if box[0] is not None:
        raise ConfigError(box[0])
    dp_rank, dp_size = data_parallel_info(mesh)
    watchdog.progress(None, "data index")
    data = prepare_data(cfg.data, plan.inputs, dp_size, cfg.run.seed, run_dir, rank)
    if rank == 0:
        _say(cfg.verbose, data.plan.summary(), data.plan.describe())

    parallelize(model, mesh, **plan.parallelize_options)
    model.to_empty(device=device)
    torch.manual_seed(cfg.run.seed)
    model.init_weights()
    if plan.pretrained is not None:
        load_into(model, plan.pretrained)
        if rank == 0:
            headline, *details = plan.pretrained.describe().splitlines()
            (run_dir / INIT_REPORT).write_text("\n".join([headline, *details, ""]))
            _say(cfg.verbose, f"{headline} (each tensor: {run_dir / INIT_REPORT})", *details)
        plan.pretrained = None  # the full tensors are no longer needed
    model.train()
    optimizer = build_optimizer(model, cfg, plan.device_type)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint.keep)

    start_step, start = 0, [0] * len(data.sources)
    if ckpt is not None:
        watchdog.progress(None, "checkpoint load")
        state = check_trainer_state(checkpointer.load(ckpt, model, optimizer), ckpt)
        start_step, start = state["step"], _start_positions(state, data.plan.names, rank)
        decode_rng(state["rng"])
        if rank == 0:
            where = dict(zip(data.plan.names, start, strict=True))
            print(f"resumed from {ckpt} at step {start_step} (data positions {where})", flush=True)

    extra = plan.spec.build_extra(model)
    validator = None
    if cfg.eval.every > 0:
        watchdog.progress(None, "validation data index")
        validator = Validator(model, plan.spec, plan.inputs, mesh, cfg, run_dir, extra, plan.tree)
    global_batch, split = cfg.data.global_batch_size, plan.batch
    loader = build_loader(
        data.sources,
        data.plan,
        dp_rank,
        start,
        start_step,
        cfg.max_steps,
        split.micro,
        cfg.run.seed,
        shuffle=cfg.data.shuffle,
        transform=plan.tree,
        num_workers=cfg.data.num_workers,
        prefetch_factor=cfg.data.prefetch_factor,
        pin_memory=plan.device_type == "cuda",
    )
    flops_per_step = train_flops_per_sample(model, pooled_head=plan.spec.pooled_head) * global_batch
    peak = peak_flops(device)
    world = dist.get_world_size()

    def data_positions(step: int) -> dict[str, int]:
        """Each dataset's stream position at ``step``: continues from the checkpoint's, so the sample
        stream is the same on any mesh (and never repeats if the batch size changes)."""
        return dict(zip(data.plan.names, positions_at(data.plan, start, start_step, step), strict=True))

    def save(step: int) -> None:
        watchdog.progress(step, "checkpoint save")
        if not parameters_finite(model):
            raise TrainingDiverged(
                f"step {step}: the parameters are not finite; not saving (the last checkpoint, "
                f"{checkpointer.last_saved or 'none'}, is kept). {DIVERGED_HINT}"
            )
        state = {"step": step, "data_positions": data_positions(step), "lr": lr_at(step, cfg), "rng": encode_rng()}
        path = checkpointer.save(step, model, optimizer, state, cfg.to_dict())
        if rank == 0:
            print(f"checkpoint {path}", flush=True)
        for hook in hooks:
            hook.on_checkpoint(step, path)

    if rank == 0:
        hooks = hooks + make_sinks(cfg.metrics.sink, run_dir, cfg.to_dict())
    guard = FiniteGuard(cfg.optim.skip_nonfinite, start_step, device)
    timer = Throughput(start_step)
    last_loss, stopped, done = None, False, start_step
    stop = StopFlag(watch_parent=launched_by_torchrun())  # before iter(loader) forks the workers: they inherit it
    batches = None
    try:
        batches = iter(loader)
        for step in range(start_step, cfg.max_steps):
            watchdog.progress(step + 1, "training step")  # numbered as in the logs: step N ends with N done
            lr = lr_at(step, cfg)
            set_lr(optimizer, lr)
            loss_sum = accumulate_gradients(
                model, plan.spec, batches, mesh, cfg, step, split.accumulation, split.micro, extra, device
            )
            grad_norm = clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
            if guard.update_ok(step + 1, loss_sum, grad_norm, checkpointer.last_saved):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            log_now = done % cfg.metrics.log_every == 0 or done == cfg.max_steps
            ckpt_now = cfg.checkpoint.every > 0 and done % cfg.checkpoint.every == 0
            eval_now = validator is not None and (done % cfg.eval.every == 0 or done == cfg.max_steps)
            if not (log_now or ckpt_now or eval_now or done % SYNC_EVERY == 0):
                continue  # no host sync on this step
            # One all-reduce carries the loss (mean over ranks = mean over data-parallel ranks),
            # the stop flag (any rank asked to stop), the non-finite steps since the last sync, and
            # whether rank 0 found the run's lock gone or taken (nothing is written after that).
            stop_flag = torch.tensor(float(stop.requested), device=device)
            lock_lost = torch.tensor(float(rank == 0 and lock.lost() is not None), device=device)
            stats = torch.stack([loss_sum.float(), stop_flag, guard.nonfinite, lock_lost])
            dist.all_reduce(stats)
            if stats[3].item() > 0:
                raise ConfigError(
                    f"--run.dir={run_dir}: its {lock.path.name} no longer names this job (the directory was deleted, "
                    f"or another job took it over): stopped at step {done} without saving or logging, so as not to "
                    "write into another run; see what that directory holds, then resume with --checkpoint.resume "
                    "auto or choose another --run.dir"
                )
            last_loss = stats[0].item() / world
            stop_now = stats[1].item() > 0
            if log_now:
                interval, overall = timer.update(done)
                tflops = flops_per_step / interval / 1e12
                record = {
                    "step": done,
                    "max_steps": cfg.max_steps,
                    "loss": last_loss,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "images_per_s": global_batch / interval,
                    "tokens_per_s": global_batch * model.num_patches / interval,
                    "tflops": tflops,
                    "mfu": None if peak is None else tflops * 1e12 / (peak * world),
                    "peak_mem_gib": _peak_memory_gib(device),
                    "eta_s": overall * (cfg.max_steps - done),
                    "time": time.time(),
                }
                if rank == 0:
                    print(format_progress(record), flush=True)
                    append_jsonl(run_dir / "metrics.jsonl", record)
                stop.requested |= any([bool(hook.on_step_end(done, record)) for hook in hooks])
            guard.check_synced(done, stats[2].item(), checkpointer.last_saved)
            if eval_now:
                watchdog.progress(done, "validation")
                metrics = _validate(validator, done, run_dir, rank)
                stop.requested |= any([bool(hook.on_eval_end(done, metrics)) for hook in hooks])
            if ckpt_now or stop_now:
                save(done)
            if stop_now:
                stopped = True
                if rank == 0:
                    why = f" (its launcher, pid {stop.parent}, is gone)" if stop.orphaned else ""
                    print(f"stop requested{why}: saved step {done}, exiting", flush=True)
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
                export_safetensors(model, plan.export_spec(), run_dir)
            if validator is not None and done > start_step:
                watchdog.progress(cfg.max_steps, "pictures")
                path = validator.pictures(run_dir / "pictures", f"{cfg.model}_step{done}")
                if path is not None:
                    print(f"pictures {path}", flush=True)
                    for hook in hooks:
                        hook.on_pictures(done, path)
        if rank == 0 and done > start_step:
            _plot_curves(run_dir)
    except (RuntimeError, ConnectionError, EOFError) as err:
        dead = dead_worker_error(err, rank, cfg.data.num_workers)
        if dead is None:
            raise
        raise dead from None
    finally:
        if batches is not None:
            close_workers(batches)
        stop.restore()
        for hook in hooks:
            hook.close()
    return TrainResult(model, steps_done=done, stopped_early=stopped, last_loss=last_loss, run_dir=run_dir)
