"""ruff (lint + format) on the repository, with the version the test extra pins: the code CI runs is
the code ruff accepts. ruff is a program of its own, so this runs in the e2e tier."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

RUFF_PATHS = ["ucfvit", "tests", "recipes", "examples", "benchmarks"]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff(command):
    if _ruff("--version").returncode:
        pytest.fail("ruff is missing; it is part of the test extra: pip install -e '.[test]'")
    paths = [p for p in RUFF_PATHS if (ROOT / p).exists()]
    result = _ruff(*command, "--no-cache", *paths)
    if result.returncode:
        pytest.fail(f"ruff {' '.join(command)} {' '.join(paths)}:\n{result.stdout}{result.stderr}", pytrace=False)
