"""Worker side of the communication tests: count collectives of one forward + backward."""

from __future__ import annotations

import torch
from torch.distributed.tensor.debug import CommDebugMode

from ucfvit.models import build_model
from ucfvit.parallel import make_mesh, parallelize


def _counts(mode: CommDebugMode) -> dict[str, int]:
    return {str(op).split(".")[-1] if "." in str(op) else str(op): n for op, n in mode.get_comm_counts().items()}


def comm_counts(mesh_spec: str, depth: int, options: dict | None = None) -> dict[str, dict[str, int]]:
    """Collectives issued by forward and by backward of a depth-``depth`` debug ViT."""
    torch.set_num_threads(1)
    mesh = make_mesh(mesh_spec)
    torch.manual_seed(0)
    model = build_model("vit", "debug", img_size=(16, 16), depth=depth, num_classes=4)
    parallelize(model, mesh, **(options or {}))
    x = torch.randn(2, 3, 16, 16)
    for _ in range(2):  # the second iteration is the steady state (lazy init happens in the first)
        with CommDebugMode() as fwd:
            loss = model(x).float().pow(2).mean()
        with CommDebugMode() as bwd:
            loss.backward()
        model.zero_grad(set_to_none=True)
    return {"forward": _counts(fwd), "backward": _counts(bwd)}
