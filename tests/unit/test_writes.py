"""Files a run writes for others are strict JSON, and a write that fails (a full disk, a quota) is one
line naming the file, not a traceback."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import pytest

from ucfvit.train.atomic import WriteError, nulled_nonfinite
from ucfvit.train.cli import run_recipe
from ucfvit.train.run_dir import RunLock
from ucfvit.train.throughput import append_jsonl


def test_non_finite_numbers_are_written_as_null_and_named():
    value, names = nulled_nonfinite({"loss": math.nan, "dice": [0.5, math.inf], "ok": 1.0, "n": 3})
    assert value == {"loss": None, "dice": [0.5, None], "ok": 1.0, "n": 3}
    assert names == ["loss", "dice[1]"]


def test_metrics_lines_are_strict_json(tmp_path):
    append_jsonl(tmp_path / "metrics.jsonl", {"step": 1, "loss": math.nan, "eval": {"psnr": -math.inf}})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in {line}")) == {
        "step": 1,
        "loss": None,
        "eval": {"psnr": None},
    }


def test_a_failed_metrics_append_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("builtins.open", full)
    path = tmp_path / "metrics.jsonl"
    with pytest.raises(WriteError, match=rf"{path}: appending a metrics line failed \(No space left on device\)"):
        append_jsonl(path, {"step": 1})

    def body():
        append_jsonl(path, {"step": 1})

    with pytest.raises(SystemExit) as stop:
        run_recipe("recipes/train.py", body)
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("recipes/train.py: write error: ") and "\n" not in err and str(path) in err


def test_a_lock_that_cannot_be_written_is_one_error_naming_it(tmp_path, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(ValueError, match=r"--run\.dir=.*: cannot write the lock .*\.lock \(Disk quota exceeded\)"):
        RunLock(tmp_path).acquire()
    assert list(tmp_path.iterdir()) == []
