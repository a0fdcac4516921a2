"""A training step makes the GPU wait for the host only where it must: at a sync point (a progress line,
a checkpoint, every SYNC_EVERY steps), never in between, and no forward copies host data to the device.

On a CPU there is no GPU to wait for, so the tests look at the operators: (1) the trainer runs with a
dispatch mode watching the device-side work of every step (loss, backward, clipping, the finite check,
the optimizer step) for operators that read a device value on the host (``.item()``, ``float(t)``,
data-dependent shapes); the sync points themselves read the loss once per log step, outside that work;
(2) every family's forward and backward runs on the meta device, where reading a value fails, under a
mode that records any operator given a host tensor (a host-to-device copy on a GPU)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import FAMILIES
from distributed import run_ranks
from ucfvit.models import SampleRNG, build_model, get_family


@pytest.mark.parametrize("model", ["vit", "mae"])
def test_training_steps_read_nothing_on_the_host(tmp_path, model):
    argv = ["--max-steps", "4", "--arch.drop-path-rate", "0.1", "--run.dir", str(tmp_path)]
    got = run_ranks(1, "train_cases:host_syncs", model, argv, timeout=300)[0]
    assert got["steps"] == 4
    assert got["syncs"] == [], f"the step reads device values on the host: {got['syncs']}"


def test_the_sync_watch_sees_a_read(tmp_path):
    # the same watch catches the host sync --optim.skip-nonfinite N costs by design (one per step)
    argv = ["--max-steps", "2", "--optim.skip-nonfinite", "1", "--run.dir", str(tmp_path)]
    got = run_ranks(1, "train_cases:host_syncs", "vit", argv, timeout=300)[0]
    assert len(got["syncs"]) == 2 and all("train/trainer.py" in s for s in got["syncs"]), got


class HostTensors(TorchDispatchMode):
    """Records operators that get a tensor of more than one element from the host (CPU)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel() > 1 for t in flat):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


# SAP embeds each quadtree region size with its own resize, so it reads which sizes occur (by design).
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "sap"])
def test_forward_and_backward_copy_nothing_from_the_host(family):
    kwargs = {"img_size": (16, 16), "drop_path_rate": 0.1}
    with torch.device("meta"):
        model = build_model(family, "debug", **kwargs)
        batch = {"image": torch.randn(4, 3, 16, 16), "label": torch.zeros(4, dtype=torch.long),
                 "seg": torch.zeros(4, 16, 16, dtype=torch.long)}  # fmt: skip
    spec = get_family(family)
    rng, extra = SampleRNG(0, 3, 0, 4, device="meta"), spec.build_extra(model)
    with HostTensors() as mode:
        spec.loss(model, batch, rng, extra).backward()
    assert not mode.seen, f"{family}: host tensors reach the device in {sorted(set(mode.seen))}"
    assert model.blocks[0].attn.proj.weight.grad is not None
