"""A training step makes the GPU wait for the host only where it must: at a sync point (a progress line,
a checkpoint, every SYNC_EVERY steps), never in between, and no forward copies host data to the device.

On a CPU there is no GPU to wait for, so the tests look at the operators: (1) the trainer runs with a
dispatch mode watching the device-side work of every step (loss, backward, clipping, the finite check,
the optimizer step) for operators that read a device value on the host (``.item()``, ``float(t)``,
data-dependent shapes); the sync points themselves read the loss once per log step, outside that work;
(2) every family's forward and backward runs on the meta device, where reading a value fails, under a
mode that records any operator given a host tensor (a host-to-device copy on a GPU). (2) is in
tests/unit/test_host_syncs.py."""

from __future__ import annotations

import pytest
import torch

from rank_runner import run_ranks
from train_runs import config
from ucfvit.train.trainer import train


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
    from ucfvit.train import guards
    from ucfvit.train import plan as plan_module
    from ucfvit.train import trainer as trainer_module

    aten = torch.ops.aten
    syncing = {
        aten._local_scalar_dense.default,
        aten.nonzero.default,
        aten.masked_select.default,
        aten._unique2.default,
        aten.equal.default,
        aten.is_nonzero.default,
    }
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
    plan_module.get_family = lambda name: dataclasses.replace(spec, loss=watched(spec.loss))  # the run plan's spec
    torch.Tensor.backward = watched(torch.Tensor.backward)
    trainer_module.clip_grad_norm_ = watched(trainer_module.clip_grad_norm_)
    guards.FiniteGuard.update_ok = watched(guards.FiniteGuard.update_ok)
    build = trainer_module.build_optimizer

    def gpu_optimizer(net, cfg, device_type):
        optimizer = build(net, cfg, "cuda")  # fused AdamW, as on a GPU (torch has a CPU kernel too)
        optimizer.step = watched(optimizer.step)
        return optimizer

    trainer_module.build_optimizer = gpu_optimizer
    result = train(config(model, argv))
    return {"steps": result.steps_done, "syncs": seen}


@pytest.mark.parametrize("model", ["vit", "mae"])
def test_training_steps_read_nothing_on_the_host(tmp_path, model):
    argv = ["--max-steps", "4", "--arch.drop-path-rate", "0.1", "--run.dir", str(tmp_path)]
    got = run_ranks(1, host_syncs, model, argv, timeout=300)[0]
    assert got["steps"] == 4
    assert got["syncs"] == [], f"the step reads device values on the host: {got['syncs']}"


def test_the_sync_watch_sees_a_read(tmp_path):
    # the same watch catches the host sync --optim.skip-nonfinite N costs by design (one per step)
    argv = ["--max-steps", "2", "--optim.skip-nonfinite", "1", "--run.dir", str(tmp_path)]
    got = run_ranks(1, host_syncs, "vit", argv, timeout=300)[0]
    assert len(got["syncs"]) == 2 and all("train/guards.py" in s for s in got["syncs"]), got
