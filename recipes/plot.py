"""Plot a run's curves from its metrics.jsonl (also written at the end of every run), or compare runs.

    python recipes/plot.py runs/mae                      # -> runs/mae/curves.png: loss, lr, throughput, validation
    python recipes/plot.py runs/scratch runs/finetuned --labels scratch fine-tuned --out compare.png

Needs matplotlib (``pip install 'ucfvit[plot]'``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ucfvit.eval.plots import plot_run, plot_runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each holding metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="PNG to write (one run: default RUN/curves.png; several: required)")
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: the directory names)")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "metrics.jsonl").is_file()]
    if missing:
        sys.exit(f"recipes/plot.py: no metrics.jsonl in {', '.join(missing)}")
    try:
        if len(args.runs) == 1 and args.labels is None:
            out = plot_run(args.runs[0], args.out)
        else:
            if args.out is None:
                sys.exit("recipes/plot.py: comparing runs needs --out FILE.png")
            out = plot_runs(args.runs, args.out, args.labels)
    except (ImportError, ValueError) as err:
        sys.exit(f"recipes/plot.py: {err}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
