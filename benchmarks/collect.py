"""Scaling-sweep collector: the runs' metrics.jsonl as ``results.csv``, ``results.md`` and PNG plots.

    python benchmarks/collect.py sweeps/frontier-vit              # the runs of its manifest.json
    python benchmarks/collect.py sweeps/frontier-vit --skip 3     # drop 3 warm-up records per run
    python benchmarks/collect.py runs/a runs/b --out scaling --peak-tflops 989   # run directories

Per run, the first ``--skip`` training records (compilation, allocator and NCCL/RCCL warm-up) are
dropped and the rest averaged over time: images/s is images over seconds (each record's rate weighted
by the steps it covers, a harmonic mean), TFLOP/s and MFU likewise; memory is the largest
``peak_mem_gib`` (rank 0's device memory). ``images_per_s`` and ``tflops`` in metrics.jsonl are of
the whole job (``ucfvit/train/trainer.py``), so per GPU means divided by the run's GPUs. MFU is the
runs' own, else TFLOP/s / (GPUs x the system's peak, from the manifest or ``--peak-tflops``).

Efficiency, per series (model, size, scaling kind, mesh rule) against its run with the fewest GPUs:
(images/s per GPU) / (the base's images/s per GPU). For weak scaling that is the per-GPU throughput
kept; for strong scaling (a fixed global batch) it is the same number read as speed-up / GPU ratio.

``status``: ``done`` (reached its max steps), ``running`` (its ``.lock`` heartbeat is fresh),
``stopped`` (records, then no more: crashed, out of time, preempted), ``failed`` (started, no
training record) or ``missing`` (not started: pending, or never submitted). Writes into the sweep
directory (or ``--out``): results.csv, results.md, throughput.png, efficiency.png, mfu.png, memory.png;
prints one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import json
import numbers
import time
from pathlib import Path

from ucfvit.eval.plots import pyplot, read_metrics
from ucfvit.parallel import parse_mesh
from ucfvit.train.run_dir import LOCK, STALE_AFTER_S

COLUMNS = [
    "name",
    "model",
    "size",
    "scaling",
    "mesh_rule",
    "nodes",
    "gpus",
    "mesh",
    "global_batch",
    "status",
    "records",
    "images_per_s",
    "images_per_s_per_gpu",
    "efficiency",
    "tflops_per_gpu",
    "mfu",
    "peak_mem_gib",
    "run_dir",
]
# Markdown table: (header, column, format)
TABLE = [
    ("run", "name", "{}"),
    ("scaling", "scaling", "{}"),
    ("nodes", "nodes", "{}"),
    ("GPUs", "gpus", "{}"),
    ("mesh", "mesh", "{}"),
    ("global batch", "global_batch", "{}"),
    ("status", "status", "{}"),
    ("images/s", "images_per_s", "{:.1f}"),
    ("images/s/GPU", "images_per_s_per_gpu", "{:.2f}"),
    ("efficiency", "efficiency", "{:.2f}"),
    ("TFLOP/s/GPU", "tflops_per_gpu", "{:.4g}"),
    ("MFU", "mfu", "{:.1%}"),
    ("memory GiB", "peak_mem_gib", "{:.2f}"),
]
PLOTS = {  # file -> (column, y label)
    "throughput.png": ("images_per_s", "images/s"),
    "efficiency.png": ("efficiency", "scaling efficiency"),
    "mfu.png": ("mfu", "MFU"),
    "memory.png": ("peak_mem_gib", "peak memory per GPU (GiB)"),
}


def time_mean(records: list[dict], key: str, steps: dict[int, int]) -> float | None:
    """Mean over time of a rate ``key`` (images/s, TFLOP/s, MFU): records weighted by the steps they cover
    (``steps``: id of a record -> its steps), i.e. total work over total time. None without values."""
    pairs = [(steps[id(r)], r[key]) for r in records if isinstance(r.get(key), numbers.Real) and r[key] > 0]
    if not pairs:
        return None
    return sum(s for s, _ in pairs) / sum(s / v for s, v in pairs)


def status_of(run_dir: Path, train: list[dict]) -> str:
    """``done``, ``running``, ``stopped``, ``failed`` or ``missing`` (see the module doc)."""
    if not (run_dir / "config.json").exists() and not (run_dir / "metrics.jsonl").exists():
        return "missing"
    if train and train[-1]["step"] >= train[-1].get("max_steps", float("inf")):
        return "done"
    lock = run_dir / LOCK
    if lock.exists() and time.time() - lock.stat().st_mtime < STALE_AFTER_S:
        return "running"
    return "stopped" if train else "failed"


def measure(run: dict, skip: int, peak_tflops: float | None) -> dict:
    """``run`` (a manifest entry with an absolute ``run_dir``) with its status and averaged numbers."""
    run_dir = Path(run["run_dir"])
    train = read_metrics(run_dir)[0] if (run_dir / "metrics.jsonl").is_file() else []
    train = [r for r in train if isinstance(r.get("images_per_s"), numbers.Real)]
    steps, previous = {}, 0
    for r in train:
        steps[id(r)], previous = max(1, r["step"] - previous), r["step"]
    kept = train[skip:]
    gpus = run["gpus"]
    images, tflops = time_mean(kept, "images_per_s", steps), time_mean(kept, "tflops", steps)
    mfu = time_mean(kept, "mfu", steps)
    if mfu is None and tflops is not None and peak_tflops:
        mfu = tflops / (gpus * peak_tflops)
    memory = [r["peak_mem_gib"] for r in kept if isinstance(r.get("peak_mem_gib"), numbers.Real)]
    return {
        **run,
        "status": status_of(run_dir, train),
        "records": len(kept),
        "images_per_s": images,
        "images_per_s_per_gpu": None if images is None else images / gpus,
        "tflops_per_gpu": None if tflops is None else tflops / gpus,
        "mfu": mfu,
        "peak_mem_gib": max(memory) if memory else None,
    }


def series_key(row: dict) -> tuple:
    return row["model"], row["size"], row["scaling"], row["mesh_rule"]


def add_efficiency(rows: list[dict]) -> None:
    """Per series: images/s per GPU over that of its run with the fewest GPUs (which has a throughput)."""
    for key in {series_key(r) for r in rows}:
        measured = [r for r in rows if series_key(r) == key and r["images_per_s_per_gpu"] is not None]
        base = min(measured, key=lambda r: r["gpus"], default=None)
        for r in rows:
            if series_key(r) == key:
                per_gpu = r["images_per_s_per_gpu"]
                r["efficiency"] = None if per_gpu is None or base is None else per_gpu / base["images_per_s_per_gpu"]


def runs_of(paths: list[Path]) -> tuple[list[dict], float | None]:
    """Manifest entries (run_dir made absolute) of every sweep directory and run directory in ``paths``,
    and the peak TFLOP/s per GPU of the sweeps' system (None: no sweep, or sweeps of several systems)."""
    runs, peaks = [], set()
    for path in paths:
        if (path / "manifest.json").is_file():
            manifest = json.loads((path / "manifest.json").read_text())
            peaks.add(manifest.get("peak_tflops_per_gpu"))
            runs += [{**r, "run_dir": str(path / r["run_dir"])} for r in manifest["runs"]]
        else:
            runs.append(run_from_dir(path))
    return runs, peaks.pop() if len(peaks) == 1 else None


def run_from_dir(path: Path) -> dict:
    """A manifest-like entry of a run directory outside a sweep, from its config.json (blank if absent)."""
    try:
        cfg = json.loads((path / "config.json").read_text())
        mesh, gpus = cfg["mesh"], parse_mesh(cfg["mesh"]).world_size
        model, size, batch = cfg["model"], cfg["model_size"], cfg["data"]["global_batch_size"]
    except (OSError, ValueError, KeyError, TypeError):
        mesh, gpus, model, size, batch = "", None, "", "", None
    return {
        "name": path.name,
        "model": model,
        "size": size,
        "scaling": "",
        "mesh_rule": "",
        "nodes": None,
        "gpus": gpus,
        "mesh": mesh,
        "global_batch": batch,
        "run_dir": str(path),
    }


def collect(paths: list[Path], skip: int = 2, peak_tflops: float | None = None) -> list[dict]:
    """One row per run (columns :data:`COLUMNS`), with efficiency, in the order given."""
    runs, sweep_peak = runs_of(paths)
    peak = peak_tflops if peak_tflops is not None else sweep_peak
    rows = [measure(run, skip, peak) if run["gpus"] else {**run, "status": "missing"} for run in runs]
    rows = [{c: row.get(c) for c in COLUMNS} for row in rows]
    add_efficiency(rows)
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)


def markdown(rows: list[dict], skip: int, plots: list[str]) -> str:
    lines = [
        "# Scaling sweep",
        "",
        f"Means over time after the first {skip} training records of each run; efficiency against the run of "
        "the series with the fewest GPUs (see benchmarks/collect.py).",
        "",
    ]
    for model, size in dict.fromkeys((r["model"], r["size"]) for r in rows):
        lines += [f"## {model or '?'}:{size or '?'}", ""]
        lines.append("| " + " | ".join(h for h, _, _ in TABLE) + " |")
        lines.append(
            "|" + "|".join("---" if c in ("name", "scaling", "mesh", "status") else "---:" for _, c, _ in TABLE) + "|"
        )
        for r in rows:
            if (r["model"], r["size"]) == (model, size):
                cells = ["–" if r[c] in (None, "") else fmt.format(r[c]) for _, c, fmt in TABLE]
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def label(key: tuple) -> str:
    model, size, scaling, rule = key
    return " ".join(filter(None, [f"{model}:{size}", scaling, rule if rule not in ("", "auto") else ""]))


def plot(rows: list[dict], column: str, ylabel: str, out: Path) -> None:
    """``column`` against GPUs, one line per series; a note instead of lines when no run has it."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for key in dict.fromkeys(series_key(r) for r in rows):
        points = sorted((r["gpus"], r[column]) for r in rows if series_key(r) == key and r[column] is not None)
        if points:
            ax.plot(*zip(*points, strict=True), "o-", label=label(key))
            drawn = True
    gpus = sorted({r["gpus"] for r in rows if r["gpus"]})
    if gpus:
        ax.set_xscale("log", base=2)
        ax.set_xticks(gpus, [str(g) for g in gpus])
    if column == "efficiency":
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_ylim(bottom=0)
    if column == "mfu":
        ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    if drawn:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, f"no run has {column} yet", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="GPUs", ylabel=ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="sweep directories (manifest.json) and/or run directories")
    parser.add_argument("--skip", type=int, default=2, help="warm-up training records to drop per run")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak per GPU for MFU (default: the sweep's)")
    parser.add_argument("--out", type=Path, help="output directory (default: the sweep directory)")
    args = parser.parse_args(argv)
    if args.skip < 0:
        parser.error(f"--skip {args.skip}: must be >= 0")
    # A run directory not made yet (a pending job) is listed as missing; none existing at all is a typo.
    if not any(p.is_dir() for p in args.paths):
        parser.error(f"{' '.join(map(str, args.paths))}: no such directory (give sweep or run directories)")
    sweeps = [p for p in args.paths if (p / "manifest.json").is_file()]
    if args.out is None and len(sweeps) != 1:
        parser.error("--out is needed unless exactly one sweep directory (with manifest.json) is given")
    out = args.out if args.out is not None else sweeps[0]
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(args.paths, args.skip, args.peak_tflops)
    for name, (column, ylabel) in PLOTS.items():
        plot(rows, column, ylabel, out / name)
    write_csv(rows, out / "results.csv")
    (out / "results.md").write_text(markdown(rows, args.skip, list(PLOTS)))
    statuses = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
    series = {
        label(key): {c: [r[c] for r in rows if series_key(r) == key] for c in ("gpus", "images_per_s", "efficiency")}
        for key in dict.fromkeys(series_key(r) for r in rows)
    }
    print(
        json.dumps(
            {
                "benchmark": "scaling_collect",
                "out": str(out),
                "skip": args.skip,
                "runs": len(rows),
                "status": statuses,
                "series": series,
            }
        )
    )


if __name__ == "__main__":
    main()
