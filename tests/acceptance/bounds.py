"""bounds: small files that expand without bound when read, and FIFOs where a file is expected.

Every trainer here runs with its address space limited to MEMORY (a tiny run needs about 1.5 GiB),
as a job's memory limit would stop it; each bomb would need more than that once expanded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .harness import (
    FLAG_TIMEOUT,
    TIMEOUT,
    Case,
    Ctx,
    HarnessError,
    base_flags,
    case,
    judge,
    last_line,
    message_lines,
    refusal_problems,
    success_problems,
)

try:  # the builders of the unit tests: tests/ is on sys.path under pytest ...
    import bombs
except ImportError:  # ... and the parent package under python -m tests.acceptance
    from .. import bombs

MEMORY = 3 << 30
OUT_OF_MEMORY = re.compile(
    r"MemoryError|bad_alloc|cannot allocate|can't allocate|out of memory|insufficient memory|failed to allocate", re.I
)


def images(root: Path, per_class: int = 2) -> Path:
    """An image-folder tree of two classes of small gray PNGs."""
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            bombs.png_declaring(root / f"c{c}" / f"img{k}.png", 20, 16)
    return root


def within_bounds(ctx: Ctx, flags: dict | list, path: Path, refuse: bool = True) -> tuple[bool, str]:
    """Run ``flags`` under MEMORY: refused (or with ``refuse`` False, trained) naming ``path``, without
    a traceback or a failed allocation, within FLAG_TIMEOUT (TIMEOUT for a run that trains)."""
    res = ctx.run(flags, timeout=FLAG_TIMEOUT if refuse else TIMEOUT, memory=MEMORY)
    problems = refusal_problems(res) if refuse else success_problems(res)
    if str(path) not in message_lines(res.out, scrub=False):
        problems.append(f"does not name {path.name}")
    if OUT_OF_MEMORY.search(res.out):
        problems.append("ran out of memory")
    verb = "refused" if refuse else "trained"
    return judge(problems, f"{verb} in {res.elapsed:.0f} s: {last_line(res.out)}")


def image_bomb(ctx: Ctx) -> tuple[bool, str]:
    """--data.root holds an 870 KiB PNG that declares 30000 x 30000 pixels (0.9 GB decoded, 3.6 GB
    as float32). Handled well: refused with one line naming the file, within 3 GiB and 120 s."""
    root = images(ctx.dir / "images")
    bomb = bombs.png_declaring(root / "c1" / "big.png", 30000, 30000)
    flags = {**base_flags(), "--data.kind": "imagefolder", "--data.root": str(root), "--run.dir": str(ctx.dir / "run")}
    return within_bounds(ctx, flags, bomb)


def nifti_bomb(ctx: Ctx) -> tuple[bool, str]:
    """--data.root holds a 2.7 MB .nii.gz of 2.7 GB (1400^3 bytes), next to a small volume.
    Handled well: refused with one line naming the file, within 3 GiB and 120 s."""
    root = ctx.dir / "volumes"
    root.mkdir()
    bombs.nifti_gz_declaring(root / "a.nii.gz", (16, 16, 16))
    bomb = bombs.nifti_gz_declaring(root / "b.nii.gz", (1400, 1400, 1400))
    flags = {
        **base_flags("mae"),
        "--arch.img-size": ["16", "16", "16"],
        "--data.kind": "nifti",
        "--data.root": str(root),
        "--data.tile": ["16", "16", "16"],
        "--run.dir": str(ctx.dir / "run"),
    }
    return within_bounds(ctx, flags, bomb)


def weights_bomb(ctx: Ctx) -> tuple[bool, str]:
    """--init.from a 3.5 MiB .pth whose zip holds 3.5 GiB of deflated zeros (more than the limit).
    Handled well: refused with one line naming the file, within 3 GiB and 120 s."""
    bomb = bombs.pth_declaring(ctx.dir / "weights.pth", 7 << 27)
    return within_bounds(ctx, {**base_flags(), "--init.from": str(bomb), "--run.dir": str(ctx.dir / "run")}, bomb)


def config_bomb(ctx: Ctx, what: str) -> tuple[bool, str]:
    """--config names a file that expands: ``aliases`` a 600-byte YAML of nested aliases (10^9 strings;
    without PyYAML it is refused as YAML), ``deep`` JSON nested 100000 deep, ``sparse`` a 3 GiB sparse
    config.json. Handled well: refused with one line naming the file, within 3 GiB and 120 s."""
    if what == "aliases":
        path = bombs.yaml_aliases(ctx.dir / "config.yaml")
    elif what == "deep":
        path = bombs.deep_json(ctx.dir / "config.json")
    elif what == "sparse":
        path = ctx.dir / "config.json"
        with open(path, "wb") as f:
            f.truncate(3 << 30)
    else:
        raise HarnessError(f"unknown config bomb {what}")
    return within_bounds(ctx, ["--config", str(path), "--run.dir", str(ctx.dir / "run")], path)


def config_fifo(ctx: Ctx) -> tuple[bool, str]:
    """--config names a FIFO (a named pipe nobody writes to). Handled well: refused with one line
    naming it, within 120 s (opening it would block forever)."""
    path = ctx.dir / "config.json"
    os.mkfifo(path)
    return within_bounds(ctx, ["--config", str(path), "--run.dir", str(ctx.dir / "run")], path)


def index_fifo(ctx: Ctx) -> tuple[bool, str]:
    """An image-folder run finished; its cached data index (RUN/data/index.json) is replaced by a
    FIFO, and the run goes on with --checkpoint.resume auto. Handled well: refused with one line
    naming the index, within 120 s (rank 0 would block reading it)."""
    root, run = images(ctx.dir / "images"), ctx.dir / "run"
    flags = {**base_flags(), "--data.kind": "imagefolder", "--data.root": str(root), "--run.dir": str(run)}
    res = ctx.run({**flags, "--checkpoint.every": "1"})
    index = run / "data" / "index.json"
    if res.rc != 0 or not index.is_file():
        raise HarnessError(f"the first run failed ({res.brief()}): {last_line(res.out)}")
    index.unlink()
    os.mkfifo(index)
    return within_bounds(ctx, {**flags, "--max-steps": "3", "--checkpoint.resume": "auto"}, index)


def data_fifo(ctx: Ctx, skip: bool) -> tuple[bool, str]:
    """The first image (in name order) of --data.root is a FIFO. Handled well: within 120 s, refused
    with one line naming it; with --data.skip-bad-files, trained without it, its path logged."""
    root = images(ctx.dir / "images")
    fifo = root / "c0" / "a.png"
    os.mkfifo(fifo)
    flags = {**base_flags(), "--data.kind": "imagefolder", "--data.root": str(root), "--run.dir": str(ctx.dir / "run")}
    if skip:
        flags["--data.skip-bad-files"] = []  # a switch: no value
    return within_bounds(ctx, flags, fifo, refuse=not skip)


def cases(nproc: int) -> list[Case]:
    return [
        case("png-declares-30000x30000", image_bomb),
        case("nii-gz-of-2.7gb", nifti_bomb),
        case("pth-of-3.5gib-deflated-zeros", weights_bomb, needs_flag="--init.from"),
        *(case(f"config-{what}", config_bomb, what=what) for what in ("aliases", "deep", "sparse")),
        case("config-fifo", config_fifo),
        case("index-fifo-on-resume", index_fifo),
        case("data-file-fifo", data_fifo, skip=False),
        case("data-file-fifo-skip-bad-files", data_fifo, skip=True, needs_flag="--data.skip-bad-files"),
    ]
