"""Smoke example: train a debug-size MAE for a few steps on synthetic images, on CPU or GPU.

    python examples/quickstart.py [--steps 30] [--family mae]

Prints the loss every few steps; it should fall. Each family is built by ``build_model``.
"""

from __future__ import annotations

import argparse
import time

import torch

from ucfvit.models import DDPMScheduler, SampleRNG, build_model, grid_patches


def synthetic_batch(step: int, batch: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of smooth blobs and their 2-class masks (blob vs background)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    centre = torch.rand(batch, 2, 1, 1, generator=gen) * 1.2 - 0.6
    radius = torch.rand(batch, 1, 1, generator=gen) * 0.3 + 0.2
    dist = ((xx - centre[:, 0]) ** 2 + (yy - centre[:, 1]) ** 2).sqrt()
    mask = (dist < radius).long()
    colour = torch.rand(batch, 3, 1, 1, generator=gen)
    image = mask.unsqueeze(1) * colour + 0.05 * torch.randn(batch, 3, size, size, generator=gen)
    return image, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="mae", choices=["vit", "mae", "unetr", "sap", "diffusion"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    classes = {"num_classes": 2} if args.family in ("vit", "unetr", "sap") else {}
    model = build_model(args.family, "debug", img_size=32, **classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = DDPMScheduler(100)
    gen = torch.Generator().manual_seed(0)
    print(f"{args.family}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}")
    start = time.perf_counter()
    for step in range(args.steps):
        image, mask = (t.to(device) for t in synthetic_batch(step, args.batch, 32, gen))
        rng = SampleRNG(seed=0, step=step, start=0, total=args.batch)
        if args.family == "mae":
            loss = model.loss(image, *model(image, rng=rng))
        elif args.family == "vit":  # classify: is the blob large?
            label = (mask.flatten(1).float().mean(1) > 0.15).long()
            loss = torch.nn.functional.cross_entropy(model(image, rng=rng), label)
        elif args.family == "unetr":
            loss = torch.nn.functional.cross_entropy(model(image, rng=rng), mask)
        elif args.family == "sap":
            loss = torch.nn.functional.cross_entropy(model(*grid_patches(image, model.patch_size), rng=rng), mask)
        else:
            noise = torch.randn_like(image)
            t = torch.randint(0, sched.num_steps, (args.batch,), device=device)
            loss = (model(sched.add_noise(image, noise, t), t, rng=rng) - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step + 1:4d}/{args.steps}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f}s")


if __name__ == "__main__":
    main()
