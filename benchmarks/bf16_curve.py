"""Does bf16 compute train like fp32? The same run twice through ``recipes/train.py`` on one device,
``--parallel.param-dtype float32`` and ``bfloat16`` (fp32 master weights and optimizer state in
both), and the gap between the two loss curves.

The losses of every step are smoothed over ``--window`` steps (a trailing mean: single steps are
noisy in either precision); the report is the largest relative gap of the smoothed curves after
warm-up, ``max |bf16 - fp32| / fp32``, and of the last smoothed values. Defaults: ViT-Base on 224x224
synthetic images for 200 steps on a GPU (the GPU recipe otherwise); ``--tiny`` (the default without
a GPU) the debug ViT on 32x32 images. Other options go to both runs, e.g. ``--model mae``.

    python benchmarks/bf16_curve.py --steps 200 --run-dir /tmp/bf16-curve

Prints one JSON line: both curves' first and last losses, ``max_rel_gap``, ``final_rel_gap``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from ucfvit.train.cli import as_argv, parse
from ucfvit.train.config import ConfigError
from ucfvit.train.trainer import train


def smoothed(losses: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` steps (fewer at the start)."""
    return [sum(losses[max(0, i + 1 - window) : i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(losses))]


def losses_of(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def compare(fp32: list[float], bf16: list[float], window: int, skip: int) -> dict:
    """The gap of the smoothed curves from step ``skip`` on (0-based)."""
    if len(fp32) != len(bf16) or len(fp32) <= skip:
        raise ValueError(f"curves of {len(fp32)} and {len(bf16)} steps: need equal lengths beyond step {skip}")
    a, b = smoothed(fp32, window), smoothed(bf16, window)
    gaps = [abs(y - x) / abs(x) for x, y in zip(a[skip:], b[skip:], strict=True)]
    return {
        "max_rel_gap": max(gaps),
        "final_rel_gap": gaps[-1],
        "smoothed_fp32_last": a[-1],
        "smoothed_bf16_last": b[-1],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--window", type=int, default=10, help="steps of the trailing mean")
    ap.add_argument("--tiny", action="store_true", help="the debug ViT on 32x32 images (default without a GPU)")
    ap.add_argument("--run-dir", help="where the two runs go (default: a temporary directory)")
    args, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.steps < 2 * args.window or args.window < 1:
        print(
            f"bf16_curve.py: error: --steps {args.steps} must be at least twice --window {args.window} (>= 1)",
            file=sys.stderr,
        )
        return 2
    if args.run_dir is not None:  # before training anything: nothing there is overwritten
        root = Path(args.run_dir)
        taken = [root / d for d in ("float32", "bfloat16") if (root / d).exists()]
        if (root.exists() and not root.is_dir()) or taken:
            why = f"holds {', '.join(map(str, taken))}" if taken else "is not a directory"
            print(f"bf16_curve.py: error: --run-dir {root} {why}; pick a new --run-dir", file=sys.stderr)
            return 2
    tiny = args.tiny or not torch.cuda.is_available()
    shape = ["--model-size", "debug", "--arch.img-size", "32", "32", "--arch.patch-size", "4"] if tiny else []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.run_dir or tmp)
        curves, seen = {}, {}
        try:
            for dtype in ("float32", "bfloat16"):
                run = {
                    "--model": "vit",
                    "--max-steps": args.steps,
                    "--metrics.log-every": 1,
                    "--run.dir": root / dtype,
                    "--checkpoint.resume": "none",
                }
                argv = [*as_argv(run), *shape, *rest, *as_argv({"--parallel.param-dtype": dtype})]
                cfg = parse(argv, accelerator=not tiny)
                train(cfg)
                curves[dtype] = losses_of(root / dtype)
                seen[dtype] = cfg.parallel.param_dtype
        except ConfigError as err:
            print(f"bf16_curve.py: error: {err}", file=sys.stderr)
            return 2
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
    fp32, bf16 = curves["float32"], curves["bfloat16"]
    record = {
        "model": cfg.model,
        "size": cfg.model_size,
        "img_size": list(cfg.arch.img_size),
        "steps": args.steps,
        "window": args.window,
        "param_dtypes": seen,
        "fp32_first": fp32[0],
        "fp32_last": fp32[-1],
        "bf16_first": bf16[0],
        "bf16_last": bf16[-1],
        **compare(fp32, bf16, args.window, args.window),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
