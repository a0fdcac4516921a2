"""Does MAE pretraining help? Pretrain ``--model mae``, then fine-tune ``--model unetr`` from it and
from scratch with the same seed, data and settings, and compare their validation curves. One JSON
line; one PNG per seed comparing the two runs' training and validation losses.

    python benchmarks/finetune_gain.py --out runs/finetune_gain             # ~10 min on 2 CPU cores
    python benchmarks/finetune_gain.py --out /tmp/fg --quick                 # tiny sizes (what the tests run)

Every run is the user's own command (``recipes/train.py`` in a subprocess, one process, mesh
1x1x1, CPU recipes: the debug model on 32x32 synthetic images); the fine-tuned runs differ only by
``--init.from``. The seed fixes the synthetic data (class intensities, shapes), the initialisation
and the masking, so each seed pretrains its own MAE on the same data its UNETR sees. The gain is
the from-scratch validation loss minus the fine-tuned one after the same number of steps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from ucfvit.eval.plots import plot_runs, read_metrics
from ucfvit.train.cli import as_argv

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "recipes" / "train.py"


def _train(run_dir: Path, args: list[str], log: Path) -> float:
    """Run ``recipes/train.py`` with ``args`` into ``run_dir``; its output goes to ``log``. Returns seconds."""
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(
            [sys.executable, str(TRAIN), "--run.dir", str(run_dir), *args], stdout=out, stderr=subprocess.STDOUT
        )
    if done.returncode != 0:
        sys.exit(f"benchmarks/finetune_gain.py: {' '.join(args[:2])} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def _last_eval(run_dir: Path) -> dict:
    evals = read_metrics(run_dir)[1]
    if not evals:
        sys.exit(f"benchmarks/finetune_gain.py: {run_dir}/metrics.jsonl holds no validation record")
    return {"step": evals[-1]["step"], **evals[-1]["eval"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for the runs, logs and PNGs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-steps", type=int, default=3000)
    parser.add_argument("--pretrain-batch", type=int, default=32, help="MAE global batch size")
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--evals", type=int, default=12, help="validations per fine-tuning run")
    parser.add_argument("--quick", action="store_true", help="tiny step counts, one seed (a smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.pretrain_steps, args.finetune_steps, args.evals = args.seeds[:1], 8, 6, 2
    if min(args.pretrain_steps, args.finetune_steps, args.evals) < 1 or args.finetune_steps % args.evals:
        sys.exit("benchmarks/finetune_gain.py: step counts must be positive and --evals must divide --finetune-steps")
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"benchmarks/finetune_gain.py: --out {args.out} is not empty; pick a new directory")
    args.out.mkdir(parents=True, exist_ok=True)

    every = args.finetune_steps // args.evals
    seeds, wall = [], 0.0
    for seed in args.seeds:
        mae, runs = args.out / f"seed{seed}" / "mae", {}
        mae.parent.mkdir()
        pretrain = as_argv(
            {
                "--model": "mae",
                "--run.seed": seed,
                "--max-steps": args.pretrain_steps,
                "--data.global-batch-size": args.pretrain_batch,
                "--schedule.warmup-steps": min(100, args.pretrain_steps // 10),
                "--eval.every": args.pretrain_steps,
                "--metrics.log-every": max(1, args.pretrain_steps // 30),
            }
        )
        wall += _train(mae, pretrain, mae.parent / "mae.log")
        for name, extra in (("scratch", []), ("from_mae", ["--init.from", str(mae)])):
            finetune = as_argv(
                {
                    "--model": "unetr",
                    "--arch.class-token": True,
                    "--run.seed": seed,
                    "--max-steps": args.finetune_steps,
                    "--eval.every": every,
                    "--metrics.log-every": every,
                }
            )
            wall += _train(mae.parent / name, finetune + extra, mae.parent / f"{name}.log")
            runs[name] = _last_eval(mae.parent / name)
        plot = plot_runs(
            [mae.parent / "scratch", mae.parent / "from_mae"],
            args.out / f"finetune_seed{seed}.png",
            labels=["UNETR from scratch", "UNETR from the MAE"],
        )
        pre = _last_eval(mae)
        seeds.append(
            {
                "seed": seed,
                "mae": {k: pre[k] for k in ("step", "psnr", "psnr_masked_input", "ssim", "ssim_masked_input")},
                **{name: {k: r[k] for k in ("step", "loss", "mean_dice", "mean_iou")} for name, r in runs.items()},
                "loss_gain": runs["scratch"]["loss"] - runs["from_mae"]["loss"],
                "plot": str(plot),
            }
        )
    print(
        json.dumps(
            {
                "benchmark": "finetune_gain",
                "pretrain_steps": args.pretrain_steps,
                "pretrain_batch": args.pretrain_batch,
                "finetune_steps": args.finetune_steps,
                "from_mae_lower_loss": sum(s["loss_gain"] > 0 for s in seeds),
                "seeds_run": len(seeds),
                "seeds": seeds,
                "wall_s": round(wall, 1),
                "host": platform.node(),
                "date": datetime.date.today().isoformat(),
            }
        )
    )


if __name__ == "__main__":
    main()
