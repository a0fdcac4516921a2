"""The acceptance matrix under pytest: its case lists are well formed, and one representative case per
category is handled well (the whole matrix is ``python -m tests.acceptance``)."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from .harness import REPO, Matrix, run_case, undo_immutable
from .registry import CATEGORIES, build_cases

pytestmark = pytest.mark.xdist_group("acceptance")  # its module fixture runs once, in one test process

NPROC = 2

# One fast case per category that still tries what the category is about.
REPRESENTATIVE = {
    "bad_flags": "optim.lr=nan",
    "code_exec": "metadata-auto-rehash-1rank",  # a pickle .metadata, its hash in any manifest recomputed
    "integrity": "flip-shard-middle-auto-1rank",
    "run_dir": "fresh-over-checkpoints",
    "ownership": "linked-checkpoints-resume-auto",
    "divergence": "vit-lr1e6",
    "hang": "sigstop-last-rank-ddp",
    "stops": "sigint-2workers-1rank-group",  # Ctrl-C reaches the loader workers too
    "misc": "config-pickle",
    "blame": "nan-npy-data",  # NaN in a data file: named as the file's fault, not a divergence
    "bounds": "config-fifo",
}


def test_case_lists_are_well_formed():
    """Unique names, every category module registered and listing cases (one of them its representative),
    and every case's arguments fit its function, whose docstring says what handling it well means."""
    package = Path(__file__).parent
    modules = {p.stem for p in package.glob("*.py")} - {"__init__", "__main__", "harness", "registry"}
    modules = {m for m in modules if not m.startswith("test_")}
    assert modules == set(CATEGORIES) == set(REPRESENTATIVE)
    cases = build_cases(NPROC)
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
    for category in CATEGORIES:
        assert REPRESENTATIVE[category] in [c.name for c in cases if c.category == category], category
    for c in cases:
        inspect.signature(c.fn).bind(None, **c.kwargs)
        assert "Handled well" in (c.fn.__doc__ or ""), f"{c.category}/{c.name}: no criteria in the docstring"


def test_list_option():
    """``python -m tests.acceptance --list`` from the repository root prints every case (no trainer run)."""
    res = subprocess.run(
        [sys.executable, "-m", "tests.acceptance", "--list", "--nproc", str(NPROC)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [f"{c.category} {c.name}" for c in build_cases(NPROC)]
    res = subprocess.run(
        [sys.executable, "-m", "tests.acceptance", "--list", "--only", "hang,misc", "--match", "sig"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0 and res.stdout, res.stderr
    assert {line.split()[0] for line in res.stdout.splitlines()} == {"hang", "misc"}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = tmp_path_factory.mktemp("acceptance")
    m = Matrix(root, NPROC)
    m.load_help()
    yield m
    undo_immutable(root)


@pytest.mark.parametrize("category", CATEGORIES)
def test_representative_case(matrix, category):
    index, case = next((i, c) for i, c in enumerate(build_cases(NPROC)) if c.name == REPRESENTATIVE[category])
    if not matrix.applies(case):
        pytest.skip(f"the trainer no longer has {case.needs_flag}")
    ok, reason, _ = run_case(matrix, index, case)
    if not ok:
        pytest.fail(f"{case.category}/{case.name}: {reason}", pytrace=False)
