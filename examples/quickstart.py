"""Smoke example: train a debug-size model for a few steps on synthetic data, on CPU or GPU, in a plain
single-process loop (no mesh, no trainer). Every registered family works the same way: its
``FamilySpec`` says how a batch becomes a loss.

    python examples/quickstart.py [--family mae] [--steps 30]

Prints the loss every few steps; it should fall.
"""

from __future__ import annotations

import argparse
import time

import torch

from ucfvit.data import SyntheticImages
from ucfvit.models import SampleRNG, build_model, get_family, list_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="mae", choices=list_models())
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    spec = get_family(args.family)
    overrides = {k.split(".", 1)[1]: v for k, v in spec.recipe.items() if k.startswith("arch.")}
    model = build_model(args.family, "debug", **{"img_size": 32, **overrides}).to(device)
    extra = spec.build_extra(model)
    data = SyntheticImages(model.img_size, model.data_chans, num_classes=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    print(f"{args.family}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}")
    start = time.perf_counter()
    for step in range(args.steps):
        indices = range(step * args.batch, (step + 1) * args.batch)
        batch = {k: v.to(device) for k, v in data.batch(indices).items()}
        loss = spec.loss(model, batch, SampleRNG(seed=0, step=step, start=0, total=args.batch), extra)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step + 1:4d}/{args.steps}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f}s")


if __name__ == "__main__":
    main()
