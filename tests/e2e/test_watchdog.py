"""No silent hang: a rank that stops making progress ends the job within ``--run.collective-timeout``.

The watchdog alone (a stalled fake loop in a subprocess), and a torchrun job whose rank is SIGSTOPped
mid-run. Its clean stop and exception notes: tests/unit/test_watchdog.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torchrun_jobs import children, kill_all
from ucfvit.train.watchdog import EXIT_CODE

ROOT = Path(__file__).parents[2]

STALLED_LOOP = """
import time
from ucfvit.train.watchdog import Watchdog
with Watchdog(1.0, rank=3) as watchdog:
    for step in range(1, 6):
        watchdog.progress(step, "training step")
        time.sleep(0.05 if step < 4 else 60)  # step 4 never ends
"""


def test_a_stalled_loop_exits_naming_rank_step_and_phase(tmp_path):
    (tmp_path / "loop.py").write_text(STALLED_LOOP)
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, str(tmp_path / "loop.py")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == EXIT_CODE, out.stderr
    assert time.monotonic() - start < 30
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ucfvit: rank 3 made no progress for 1 s at step 4 (training step); "), out.stderr
    assert "--run.collective-timeout=1" in last
    assert "time.sleep(0.05 if step < 4 else 60)" in out.stderr  # the loop's stack shows where it waits


def test_a_sigstopped_rank_ends_the_whole_torchrun_job(tmp_path):
    """One worker SIGSTOPped: the other exits after the 5 s timeout naming the step, and torchrun
    SIGKILLs the stopped one after its grace period (30 s, fixed for a failed worker group)."""
    timeout, grace = 5, 30
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    argv = [
        *["--model", "vit", "--mesh", "1x1x2", "--max-steps", "100000", "--metrics.log-every", "1"],
        *["--run.collective-timeout", str(timeout), "--run.dir", str(run_dir)],
    ]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*launcher, str(ROOT / "recipes" / "train.py"), *argv]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    metrics, stopped = run_dir / "metrics.jsonl", None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        workers = children(proc.pid)
        assert len(workers) == 2 and proc.poll() is None, log.read_text()[-3000:]
        stopped = workers[1]
        os.kill(stopped, signal.SIGSTOP)
        stopped_at = time.monotonic()
        logged = len(metrics.read_text().splitlines())
        try:
            proc.wait(timeout=timeout + grace + 60)  # the hard limit: never hang the suite
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job did not end:\n{log.read_text()[-3000:]}")
        took = time.monotonic() - stopped_at
        text = log.read_text()
        assert proc.returncode != 0, text[-3000:]
        found = re.search(r"ucfvit: rank (\d) made no progress for \d+ s at step (\d+) \(training step\)", text)
        assert found, text[-3000:]
        # The stopped rank may already have made its collectives of the next step, so the survivor
        # can finish at most that one step more; the step it names is the one after its last line.
        last = json.loads(metrics.read_text().splitlines()[-1])["step"]
        assert int(found[2]) == last + 1 and last in (logged, logged + 1), (found[0], logged, last)
        assert took < timeout + grace + 15, f"the job took {took:.1f} s to end after SIGSTOP"
        print(f"job ended {took:.1f} s after SIGSTOP")
    finally:
        if proc.poll() is None:
            kill_all(proc)
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGKILL)
                os.kill(stopped, signal.SIGCONT)
