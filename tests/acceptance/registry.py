"""The categories of the acceptance matrix, in the order they run and report.

A category is a module of this package with a ``cases(nproc) -> list[Case]`` function; adding one is
that module plus its line here.
"""

from __future__ import annotations

import dataclasses
import importlib

from .harness import Case

CATEGORIES = (
    "bad_flags",  # each numeric flag given 0 / negative / nan / inf / out-of-range values
    "code_exec",  # pickle payloads planted in a checkpoint, also with any hash manifest recomputed
    "integrity",  # damaged, missing or foreign checkpoint files
    "run_dir",  # reusing, racing on and crashing in run directories
    "ownership",  # links into other runs, directories changing under a job, step names, stale locks
    "divergence",  # non-finite losses
    "hang",  # a stopped rank
    "stops",  # SIGTERM/SIGINT/SIGHUP with and without loader workers, at one rank and under torchrun
    "misc",  # wrong command lines and paths, incompatible resumes, preemption, a full disk
    "blame",  # NaN data or weights, bad JSON, stale indexes, typos: named where they enter, in one line
    "bounds",  # small files that expand without bound when read, FIFOs where a file is expected
)


def category_cases(category: str, nproc: int) -> list[Case]:
    """The cases of one category, each marked with it; ``nproc`` is the rank count of the multi-rank cases."""
    module = importlib.import_module(f".{category}", __package__)
    return [dataclasses.replace(c, category=category) for c in module.cases(nproc)]


def build_cases(nproc: int) -> list[Case]:
    return [c for category in CATEGORIES for c in category_cases(category, nproc)]
