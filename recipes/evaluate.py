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

import torch.distributed as dist
import tyro

from ucfvit.data.readers import DataError
from ucfvit.train.checkpoint import CheckpointError
from ucfvit.train.config import ConfigError
from ucfvit.train.evaluate import EvaluateConfig, evaluate


def main(argv: list[str] | None = None) -> None:
    args = tyro.cli(EvaluateConfig, args=sys.argv[1:] if argv is None else argv, description=__doc__)
    error = None
    try:
        evaluate(args)
    except ConfigError as err:
        error = f"error: {err}"
    except CheckpointError as err:
        error = f"checkpoint error: {err}"
    except DataError as err:
        error = f"data error: {err}"
    if dist.is_initialized():
        dist.destroy_process_group()
    if error is not None:
        sys.exit(f"recipes/evaluate.py: {error}")


if __name__ == "__main__":
    main()
