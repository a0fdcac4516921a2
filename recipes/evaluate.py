"""Evaluate a trained ucfvit model on held-out data; writes eval.json and a PNG picture.

    python recipes/evaluate.py --run.dir runs/mae                          # the run's newest checkpoint
    torchrun --standalone --nproc_per_node 4 recipes/evaluate.py --run.dir runs/mae --mesh 2x1x2
    python recipes/evaluate.py --checkpoint runs/mae/checkpoints/step-00000300
    python recipes/evaluate.py --checkpoint runs/mae/model.safetensors      # an export
    python recipes/evaluate.py --run.dir runs/unetr --eval.image-size 64 64  # sliding window over larger images

Metrics per family: ViT top-1/top-5 and loss; MAE masked MSE, PSNR and SSIM; UNETR/SAP per-class Dice
and IoU; diffusion per-channel statistics of DDIM (or DDPM) samples against the data.
"""

from __future__ import annotations

import sys

import tyro

from ucfvit.train.cli import run_recipe
from ucfvit.train.evaluate import EvaluateConfig, evaluate


def main(argv: list[str] | None = None) -> None:
    args = tyro.cli(EvaluateConfig, args=sys.argv[1:] if argv is None else argv, description=__doc__)
    run_recipe("recipes/evaluate.py", lambda: evaluate(args))


if __name__ == "__main__":
    main()
