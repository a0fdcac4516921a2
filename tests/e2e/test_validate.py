"""recipes/train.py checks its options before anything is created: one line on stderr for an
out-of-range value, no traceback, no run directory. The checks in one process:
tests/unit/test_validate.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_entry_point_prints_one_line_and_creates_nothing(tmp_path):
    cases = {
        "--optim.lr": ["--optim.lr", "nan"],
        "--arch.patch-size": ["--arch.patch-size", "0"],
        "--run.seed": ["--run.seed", "-1"],
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    train = [sys.executable, str(ROOT / "recipes/train.py"), "--model", "mae"]
    procs = {
        name: subprocess.Popen(
            [*train, *argv, "--run.dir", str(tmp_path / name)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, argv in cases.items()
    }  # launched together: each spends its seconds importing torch
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode != 0, out + err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and f"{name}=" in lines[0] and "Traceback" not in err, err
        assert lines[0].startswith("recipes/train.py: error: "), err
        assert not (tmp_path / name).exists()
