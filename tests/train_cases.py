"""Worker side of the trainer tests: run ucfvit.train.train in forked ranks."""

from __future__ import annotations

import os
import signal

import torch
import tyro
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from ucfvit.parallel import full_state_dict
from ucfvit.train import checkpoint as ckpt_module
from ucfvit.train.config import Config
from ucfvit.train.export import load_exported
from ucfvit.train.presets import preset
from ucfvit.train.trainer import train


def config(model: str, argv: list[str]) -> Config:
    """The CPU preset of ``model`` with command-line style overrides."""
    return tyro.cli(Config, default=preset(model, accelerator=False), args=["--model", model, *argv])


def run(model: str, argv: list[str]) -> dict:
    """Train; report the outcome (and a digest of the final parameters)."""
    result = train(config(model, argv))
    state = full_state_dict(result.model, rank0_only=False)
    return {
        "steps": result.steps_done, "stopped": result.stopped_early, "loss": result.last_loss,
        "params": {k: v.double().sum().item() for k, v in state.items()},
    }  # fmt: skip


def error(model: str, argv: list[str]) -> str:
    try:
        train(config(model, argv))
    except ValueError as err:
        return f"ValueError: {err}"
    return "no error"


def all_presets(steps: int, run_dir: str) -> list[dict]:
    """Every family in 2D and 3D for ``steps`` steps on one rank."""
    out = []
    for model in ("vit", "mae", "unetr", "sap", "diffusion"):
        for img in (["32", "32"], ["16", "16", "16"]):
            result = train(
                config(
                    model,
                    [
                        "--max-steps",
                        str(steps),
                        "--arch.img-size",
                        *img,
                        "--run.dir",
                        f"{run_dir}/{model}-{len(img)}d",
                        "--metrics.log-every",
                        "1",
                    ],
                )
            )
            out.append({"model": model, "ndim": len(img), "steps": result.steps_done, "loss": result.last_loss})
    return out


def export_matches(model: str, argv: list[str]) -> dict:
    """Exported safetensors in a plain model reproduce the parallel model's outputs."""
    result = train(config(model, [*argv, "--checkpoint.export-safetensors"]))
    parallel = result.model.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = parallel(x, rng=torch.Generator().manual_seed(1))
    out = out[0] if isinstance(out, tuple) else out
    if torch.distributed.get_rank() != 0:
        return {}
    plain = load_exported(result.run_dir).eval()
    ref = plain(x, rng=torch.Generator().manual_seed(1))
    ref = ref[0] if isinstance(ref, tuple) else ref
    return {
        "diff": (out - ref).abs().max().item(),
        "plain_is_plain": not any(type(p).__name__ == "DTensor" for p in plain.parameters()),
    }


def crash_during_save(model: str, argv: list[str], when: str) -> None:
    """SIGKILL this (single) rank during its second checkpoint write: ``when`` is ``start``
    (temporary directory just created) or ``after_shards`` (DCP files written, not yet renamed)."""
    real_save = ckpt_module.dcp.save
    calls = []

    def save(state, checkpoint_id):
        calls.append(checkpoint_id)
        if len(calls) == 2 and when == "start":
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(state, checkpoint_id=checkpoint_id)
        if len(calls) == 2 and when == "after_shards":
            os.kill(os.getpid(), signal.SIGKILL)

    ckpt_module.dcp.save = save
    train(config(model, argv))


def checkpoint_keys(model: str, argv: list[str]) -> list[str]:
    """Keys a checkpoint of this configuration holds (model state dict, after one training run)."""
    result = train(config(model, argv))
    return sorted(get_model_state_dict(result.model))


def host_syncs(model: str, argv: list[str]) -> dict:
    """Train with the GPU recipe's fused AdamW while a dispatch mode watches the device-side work of each
    step (the family's loss, backward, gradient clipping, the finite check, the optimizer step) for
    operators that make the host read a device value (``.item()``, ``float(t)``, ``bool(t)``, shapes
    that depend on data). Integer scalars are not counted: DTensor reads shard offsets from host index
    tensors. Reports the steps and every such operator with the line of ucfvit code that ran it."""
    import dataclasses
    import functools
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    from ucfvit.models import get_family
    from ucfvit.train import trainer as trainer_module

    aten = torch.ops.aten
    syncing = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
               aten._unique2.default, aten.equal.default, aten.is_nonzero.default}  # fmt: skip
    seen: list[str] = []

    class Syncs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            host_index = func is aten._local_scalar_dense.default and not (
                args[0].is_floating_point() or args[0].dtype == torch.bool
            )
            if func in syncing and not host_index:
                ours = [f for f in traceback.extract_stack() if "/ucfvit/" in f.filename]
                seen.append(
                    f"{func} at {ours[-1].filename.split('/ucfvit/')[-1]}:{ours[-1].lineno}" if ours else str(func)
                )
            return func(*args, **(kwargs or {}))

    def watched(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with Syncs():
                return fn(*args, **kwargs)

        return inner

    spec = get_family(model)
    trainer_module.get_family = lambda name: dataclasses.replace(spec, loss=watched(spec.loss))
    torch.Tensor.backward = watched(torch.Tensor.backward)
    trainer_module.clip_grad_norm_ = watched(trainer_module.clip_grad_norm_)
    trainer_module._FiniteGuard.update_ok = watched(trainer_module._FiniteGuard.update_ok)
    build = trainer_module.build_optimizer

    def gpu_optimizer(net, cfg, device_type):
        optimizer = build(net, cfg, "cuda")  # fused AdamW, as on a GPU (torch has a CPU kernel too)
        optimizer.step = watched(optimizer.step)
        return optimizer

    trainer_module.build_optimizer = gpu_optimizer
    result = train(config(model, argv))
    return {"steps": result.steps_done, "syncs": seen}
