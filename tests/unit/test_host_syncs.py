"""No forward copies host data to the device: every family's forward and backward runs on the meta
device, where reading a value fails, under a mode that records any operator given a host tensor (a
host-to-device copy on a GPU). The trainer's steps are watched in tests/e2e/test_host_syncs.py."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import FAMILIES
from ucfvit.models import SampleRNG, build_model, get_family


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
        batch = {
            "image": torch.randn(4, 3, 16, 16),
            "label": torch.zeros(4, dtype=torch.long),
            "seg": torch.zeros(4, 16, 16, dtype=torch.long),
        }
    spec = get_family(family)
    rng, extra = SampleRNG(0, 3, 0, 4, device="meta"), spec.build_extra(model)
    with HostTensors() as mode:
        spec.loss(model, batch, rng, extra).backward()
    assert not mode.seen, f"{family}: host tensors reach the device in {sorted(set(mode.seen))}"
    assert model.blocks[0].attn.proj.weight.grad is not None
