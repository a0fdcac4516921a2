"""Run the acceptance matrix: every case of every category, as trainer subprocesses.

From the repository root::

    python -m tests.acceptance                        # everything (minutes on 2 CPU cores)
    python -m tests.acceptance --only code_exec --jobs 4
    python -m tests.acceptance --match shard --keep   # keep the scratch dirs to look at
    python -m tests.acceptance --list                 # the cases, one "category name" a line

stderr gets one line per case (``PASS|FAIL category name: reason``); stdout gets ONE JSON line::

    {"cases": N, "handled_well": M, "by_category": {cat: [tried, well]}, "failed": [names...]}

Every subprocess (and every process it starts, found by an environment tag) is killed at a hard
timeout, so the matrix itself cannot hang. ``tests/acceptance/test_acceptance.py`` runs one case per
category under pytest.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .harness import Case, Matrix, run_case, undo_immutable
from .registry import CATEGORIES, build_cases


def select(cases: list[Case], only: str | None, match: str | None) -> list[Case]:
    if only:
        cases = [c for c in cases if c.category in only.split(",")]
    if match:
        cases = [c for c in cases if match in c.name]
    return cases


def run_all(matrix: Matrix, cases: list[Case], jobs: int) -> list[tuple[bool, str, float]]:
    """Run ``cases`` ``jobs`` at a time (the slow ones first), printing a line per case as it ends."""
    order = sorted(range(len(cases)), key=lambda i: not cases[i].slow)
    results: dict[int, tuple[bool, str, float]] = {}
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(run_case, matrix, i, cases[i]): i for i in order}
        for future in concurrent.futures.as_completed(futures):
            i = futures[future]
            ok, reason, took = results[i] = future.result()
            verdict = "PASS" if ok else "FAIL"
            print(f"{verdict} {cases[i].category} {cases[i].name}: {reason} [{took:.0f}s]", file=sys.stderr, flush=True)
    return [results[i] for i in range(len(cases))]


def summary(cases: list[Case], results: list[tuple[bool, str, float]]) -> dict:
    by_category: dict[str, list[int]] = {}
    for case, (ok, _, _) in zip(cases, results, strict=True):
        tally = by_category.setdefault(case.category, [0, 0])
        tally[0] += 1
        tally[1] += ok
    return {
        "cases": len(cases),
        "handled_well": sum(ok for ok, _, _ in results),
        "by_category": by_category,
        "failed": [f"{case.category}/{case.name}" for case, (ok, _, _) in zip(cases, results, strict=True) if not ok],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.acceptance", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help=f"run one category (comma-separated for several): {', '.join(CATEGORIES)}")
    parser.add_argument("--match", help="run only cases whose name contains this")
    parser.add_argument("--jobs", type=int, default=2, help="cases in parallel (default 2)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks of the multi-rank cases (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (printed at the end)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.nproc < 2:
        parser.error("--jobs must be >= 1 and --nproc >= 2")
    unknown = set(args.only.split(",")) - set(CATEGORIES) if args.only else set()
    if unknown:
        parser.error(f"--only: unknown categories {sorted(unknown)}")

    cases = select(build_cases(args.nproc), args.only, args.match)
    if args.list:
        for c in cases:
            print(f"{c.category} {c.name}")
        return 0

    root = Path(tempfile.mkdtemp(prefix="ucfvit-acceptance-"))
    matrix = Matrix(root, args.nproc)
    start = time.monotonic()
    try:
        matrix.load_help()
        for c in cases:
            if not matrix.applies(c):
                print(f"SKIP {c.category} {c.name}: {c.needs_flag} not in --help", file=sys.stderr)
        cases = [c for c in cases if matrix.applies(c)]
        results = run_all(matrix, cases, args.jobs)
    finally:
        if args.keep:
            print(f"scratch kept in {root}", file=sys.stderr)
        else:
            undo_immutable(root)
            shutil.rmtree(root, ignore_errors=True)

    print(f"acceptance matrix: {time.monotonic() - start:.0f} s with --jobs {args.jobs}", file=sys.stderr)
    print(json.dumps(summary(cases, results)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
