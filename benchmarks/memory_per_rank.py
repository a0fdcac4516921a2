"""Parameter memory per rank of a parallelized model on a simulated mesh (no GPU, no kernels).

One process pretends to be rank 0 of ``ddp*fsdp*tp`` ranks (the ``fake`` process-group backend),
builds the model on the meta device, parallelizes it, and sums the bytes of the local shards.

    python benchmarks/memory_per_rank.py --mesh 16x32x8 --model vit --size huge
    python benchmarks/memory_per_rank.py --mesh 16x32x8 --embed-dim 5120 --depth 48 --num-heads 40

Prints one JSON line: total parameters, bytes per rank, and the ideal total/(fsdp*tp).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore

from ucfvit.models import build_model
from ucfvit.parallel import make_mesh, parallelize, parse_mesh


def simulate(mesh: str, model: str = "vit", size: str = "huge", **overrides) -> dict:
    """Parallelize a meta-device model on a fake ``mesh`` and report rank 0's parameter bytes."""
    shape = parse_mesh(mesh)
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=shape.world_size)
    device_mesh = make_mesh(shape, device_type="cpu")
    with torch.device("meta"):
        net = build_model(model, size, **overrides)
    total_params = sum(p.numel() for p in net.parameters())
    total_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    parallelize(net, device_mesh)
    local = 0
    for p in net.parameters():
        shard = p.to_local() if isinstance(p, DTensor) else p
        local += shard.numel() * shard.element_size()
    ideal = total_bytes / (shape.fsdp * shape.tp)
    return {
        "mesh": str(shape), "model": model, "size": size, "params": total_params,
        "bytes_per_rank": local, "ideal_bytes_per_rank": ideal, "ratio_to_ideal": local / ideal,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", default="16x32x8")
    parser.add_argument("--model", default="vit")
    parser.add_argument("--size", default="huge")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--embed-dim", type=int)
    parser.add_argument("--depth", type=int)
    parser.add_argument("--num-heads", type=int)
    args = parser.parse_args()
    overrides = {k: v for k, v in [("embed_dim", args.embed_dim), ("depth", args.depth),
                                   ("num_heads", args.num_heads)] if v is not None}  # fmt: skip
    print(json.dumps(simulate(args.mesh, args.model, args.size, img_size=args.img_size, **overrides)))


if __name__ == "__main__":
    main()
