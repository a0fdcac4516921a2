"""What a run prints at its start: a few lines by default, everything with --verbose; the full
resolved config is in the run directory either way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _train(run_dir: Path, *extra: str) -> list[str]:
    argv = ["--model", "vit", "--max-steps", "2", "--metrics.log-every", "1", "--run.dir", str(run_dir), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "train.py"), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines()


def _start(lines: list[str]) -> list[str]:
    """The lines before the first progress line."""
    return lines[: next(i for i, line in enumerate(lines) if line.startswith("step "))]


def test_a_run_starts_with_a_few_lines_and_verbose_prints_the_rest(tmp_path):
    quiet = _start(_train(tmp_path / "quiet"))
    assert len(quiet) <= 4, quiet
    assert quiet[0].startswith("ucfvit: vit/debug on mesh 1x1x1") and "new run" in quiet[0], quiet
    assert any(line.startswith("parallelize:") for line in quiet) and any(line.startswith("data:") for line in quiet)
    config = json.loads((tmp_path / "quiet" / "config.json").read_text())
    assert config["model"] == "vit" and config["run"]["dir"] == str(tmp_path / "quiet")
    assert (tmp_path / "quiet" / "data" / "plan.json").is_file()

    loud = _start(_train(tmp_path / "loud", "--verbose"))
    text = "\n".join(loud)
    assert len(loud) > 20 and '"model": "vit"' in text and "data plan (automatic" in text, text
    assert set(quiet[1:]) <= set(loud), "--verbose prints what the quiet start prints, and more"
