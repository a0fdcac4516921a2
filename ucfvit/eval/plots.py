"""Curves of a run's ``metrics.jsonl`` as PNG (matplotlib, an optional dependency: ``pip install 'ucfvit[plot]'``).

Training lines hold ``step``, ``loss``, ``lr``, ``images_per_s`` and ``mfu``; validation lines hold
``step`` and ``eval`` (the task's metrics). :func:`plot_run` draws one run, :func:`plot_runs`
compares the losses of several (e.g. fine-tuned against from scratch).
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_run", "plot_runs", "pyplot", "read_metrics"]


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """``(training lines, validation lines)`` of a ``metrics.jsonl`` (or of a run directory's).
    A line that is not a JSON object (e.g. cut short by a crash) is skipped."""
    path = Path(path)
    path = path / "metrics.jsonl" if path.is_dir() else path
    train, evals = [], []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            (evals if isinstance(record.get("eval"), dict) else train).append(record)
    return train, evals


def pyplot():
    """matplotlib.pyplot on the Agg backend, or an ImportError that gives the install command."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'ucfvit[plot]' (or pip install matplotlib)") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), numbers.Real)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Loss (training and validation), learning rate, throughput (and MFU) and every scalar validation
    metric against the step, as ``<run_dir>/curves.png`` (or ``out``); returns the path."""
    plt = pyplot()
    run_dir = Path(run_dir)
    train, evals = read_metrics(run_dir)
    if not train and not evals:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no training or validation lines")
    flat = [{"step": r["step"], **r["eval"]} for r in evals]
    metrics = sorted({k for r in flat for k, v in r.items() if isinstance(v, numbers.Real)} - {"step", "samples"})
    metrics = [m for m in metrics if m != "loss"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0][0]
    ax.plot(*_series(train, "loss"), label="training")
    if evals:
        ax.plot(*_series(flat, "loss"), "o-", label="validation")
    ax.set(title="loss", xlabel="step", yscale="log" if _positive(train, "loss") else "linear")
    ax.legend()
    axes[0][1].plot(*_series(train, "lr"))
    axes[0][1].set(title="learning rate", xlabel="step")
    ax = axes[1][0]
    ax.plot(*_series(train, "images_per_s"), color="tab:green")
    ax.set(title="throughput", xlabel="step", ylabel="images/s")
    steps, mfu = _series(train, "mfu")
    if mfu:
        twin = ax.twinx()
        twin.plot(steps, [100 * m for m in mfu], color="tab:purple")
        twin.set_ylabel("MFU %")
    ax = axes[1][1]
    for name in metrics:
        ax.plot(*_series(flat, name), "o-", label=name)
    ax.set(title="validation metrics" if metrics else "validation metrics (none: --eval.every 0)", xlabel="step")
    if metrics:
        ax.legend(fontsize="small")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _positive(records: list[dict], key: str) -> bool:
    values = _series(records, key)[1]
    return bool(values) and min(values) > 0


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None) -> Path:
    """The training (lines) and validation (markers) losses of several runs on one plot, as ``out``."""
    plt = pyplot()
    labels = list(labels) if labels is not None else [Path(r).name for r in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    fig, ax = plt.subplots(figsize=(8, 5))
    log = True
    for run_dir, label in zip(run_dirs, labels, strict=True):
        train, evals = read_metrics(run_dir)
        (line,) = ax.plot(*_series(train, "loss"), label=f"{label} (training)")
        flat = [{"step": r["step"], **r["eval"]} for r in evals]
        if flat:
            ax.plot(*_series(flat, "loss"), "o--", color=line.get_color(), label=f"{label} (validation)")
        log = log and _positive(train, "loss")
    ax.set(xlabel="step", ylabel="loss", yscale="log" if log else "linear")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
