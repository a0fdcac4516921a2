"""The README's shell commands run, in the order written, as a new user would run them.

Every ```bash block of README.md runs top to bottom in one fresh directory that links the
checkout's recipes/, benchmarks/, examples/, launch/ and containers/ (the package is importable
from the checkout, no GPU is visible). A command that fails fails the test. The rules, which
docs/testing.md states for doc writers:

- a line ending in ``\\`` continues on the next; ``#`` starts a comment;
- in a ``cmd && cmd`` chain, the parts that create or activate a virtual environment or run
  ``pip install`` are dropped (this test runs in the installed environment);
- ``pytest`` commands are not run (this test is part of that suite), nor commands starting with
  ``sbatch``, ``srun``, ``docker``, ``enroot`` or ``apptainer`` (a cluster or a container runtime);
- a block right after a line ``<!-- not run: REASON -->`` is not run (your files, a GPU, network);
- shortening for CPU: ``--max-steps 2`` is appended to every ``recipes/train.py`` command (it
  overrides an earlier ``--max-steps``). Nothing else is changed.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "README.md").is_file() and (p / "recipes").is_dir())
LINKED = ["recipes", "benchmarks", "examples", "launch", "containers"]
NOT_RUN = re.compile(r"^<!-- not run: (\S.*?) -->$")
CLUSTER = {"sbatch", "srun", "docker", "enroot", "apptainer"}
SHORTEN = ["--max-steps", "2"]
TIMEOUT = 600  # seconds for one command


def bash_blocks(text: str) -> list[tuple[int, str | None, list[str]]]:
    """(line number of the fence, the not-run reason or None, the block's lines) per ```bash block."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            before = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
            reason = m.group(1) if (m := NOT_RUN.match(before)) else None
            end = lines.index("```", i + 1)
            blocks.append((i + 1, reason, lines[i + 1 : end]))
            i = end
        i += 1
    return blocks


def _is_setup(words: list[str]) -> bool:
    """A part of a chain that makes or enters a virtual environment, or installs packages."""
    return (
        words[:1] == ["pip"]
        or words[1:3] == ["-m", "venv"]
        or words[1:3] == ["-m", "pip"]
        or (words[:1] in (["."], ["source"]) and words[1:2] != [] and words[1].endswith("/activate"))
    )


def commands(block: list[str]) -> list[tuple[list[str], str | None]]:
    """(argv, why it is not run or None) for every command of a block, after the rules above."""
    logical, pending, out = [], "", []
    for raw in block:
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
        else:
            logical.append(pending + raw)
            pending = ""
    for line in logical:
        words = shlex.split(line, comments=True)
        parts = [[]]
        for word in words:
            if word == "&&":
                parts.append([])
            else:
                parts[-1].append(word)
        for argv in filter(None, parts):
            assert not set(argv) & {"|", ";", "||", ">", ">>", "<", "&"}, f"only && chains are supported: {line}"
            if _is_setup(argv):
                continue
            if argv[0] == "pytest" or argv[1:3] == ["-m", "pytest"]:
                out.append((argv, "the test suite itself"))
            elif argv[0] in CLUSTER:
                out.append((argv, "needs a cluster or a container runtime"))
            else:
                out.append(([*argv, *SHORTEN] if "recipes/train.py" in argv else argv, None))
    return out


def _run(argv: list[str], cwd: Path, env: dict) -> tuple[int, str, float]:
    start = time.time()
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
        out, _ = proc.communicate()
        return -1, out.decode(errors="replace") + f"\n(timed out after {TIMEOUT} s)", time.time() - start
    return proc.returncode, out.decode(errors="replace"), time.time() - start


def test_the_rules_read_a_block_as_documented():
    text = "x\n<!-- not run: needs a GPU -->\n\n```bash\ngpu-only\n```\n```bash\npython a.py \\\n  --b 1  # note\n```\n"
    (l1, r1, b1), (l2, r2, b2) = bash_blocks(text)
    assert (l1, r1, b1) == (4, "needs a GPU", ["gpu-only"]) and (l2, r2) == (7, None)
    assert commands(b2) == [(["python", "a.py", "--b", "1"], None)]
    chain = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && pytest -q'
    assert commands([chain]) == [(["pytest", "-q"], "the test suite itself")]
    assert commands(["python3 -m venv .venv && torchrun recipes/train.py --model mae"]) == [
        (["torchrun", "recipes/train.py", "--model", "mae", "--max-steps", "2"], None)
    ]
    assert commands(["sbatch -A P job.sbatch"])[0][1] == "needs a cluster or a container runtime"


def test_the_readme_commands_run_in_order(tmp_path):
    work = tmp_path / "checkout"
    work.mkdir()
    for name in LINKED:
        (work / name).symlink_to(ROOT / name)
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    ran, skipped = [], []
    for line, reason, block in bash_blocks((ROOT / "README.md").read_text()):
        for argv, why in commands(block):
            if reason or why:
                skipped.append(f"README.md:{line}: {shlex.join(argv)} ({reason or why})")
                continue
            code, out, seconds = _run(argv, work, env)
            ran.append(f"README.md:{line}: {shlex.join(argv)} ({seconds:.0f} s)")
            if code != 0:
                done = "\n".join(ran[:-1]) or "(none)"
                pytest.fail(
                    f"README.md:{line}: `{shlex.join(argv)}` exited with {code}.\n"
                    f"Commands that ran before it:\n{done}\nIts output (end):\n{out[-4000:]}",
                    pytrace=False,
                )
    print("ran:", *ran, "not run:", *skipped, sep="\n")
    assert ran and ran[0].split(": ", 1)[1].startswith("torchrun --standalone --nproc_per_node 8 recipes/train.py")
