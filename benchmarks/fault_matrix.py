"""Fault matrix: how ``recipes/train.py`` copes with a hostile user, bad inputs and broken runs.

Every case runs the trainer as a subprocess only (never imports ucfvit), so the same script
measures any version of the code. Each case is judged by generic criteria, written down next
to it: what a careful trainer should do (refuse with a one-line message naming the problem,
never execute code from a checkpoint, never silently lose or mix up runs, never hang), not what
one particular implementation prints.

    python benchmarks/fault_matrix.py                    # everything (minutes on 2 CPU cores)
    python benchmarks/fault_matrix.py --only code_exec --jobs 4
    python benchmarks/fault_matrix.py --match shard --keep   # keep the scratch dirs to look at

stderr gets one line per case (``PASS|FAIL category name: reason``); stdout gets ONE JSON line::

    {"cases": N, "handled_well": M, "by_category": {cat: [tried, well]}, "failed": [names...]}

Categories: bad_flags (each numeric flag given 0 / negative / nan / inf / out-of-range values),
code_exec (pickle payloads planted in a checkpoint, also with any hash manifest recomputed),
integrity (damaged, missing or foreign checkpoint files), run_dir (reusing, racing on and
crashing in run directories), divergence (non-finite losses), hang (a stopped rank), misc.

Every subprocess (and every process it starts, found by an environment tag) is killed at a
hard timeout, so the matrix itself cannot hang.

Measured on commit 263652e (the code before the robustness work): 166 cases, 35 handled well
(bad_flags 9/80, code_exec 2/26, integrity 1/17, run_dir 2/13, divergence 0/4, hang 1/4,
misc 20/22); the full run took 485 s with --jobs 2 on 2 CPU cores (shared with other work).
Measured on commit 6ba5780 (issue #9 done): 166 cases, 166 handled well; 348 s with --jobs 2.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "recipes" / "train.py"
TAG_VAR = "UCFVIT_FAULT_MATRIX_TAG"
TIMEOUT = 240  # hard limit of one trainer subprocess (s)
FLAG_TIMEOUT = 120  # ... of one bad-flag run (a bad flag that is accepted trains 2 tiny steps)
HANG_LIMIT = 120  # a job with a stopped rank must end within this (s)
PROBLEM = re.compile(
    r"corrupt|checksum|hash|digest|mismatch|integrity|damaged|truncat|missing|incomplete|invalid|not found|"
    r"does not exist|no such file|unreadable|cannot (read|load|open)|could not (read|load|open)|"
    r"failed to (read|load|open)|unexpected|malformed|size|no (complete|valid|usable)",
    re.I,
)
SAYS_WHAT = re.compile(
    r"resum|continu|already|fresh|from scratch|nothing (left )?to do|new run|up to date|start(ing|ed)? over", re.I
)
SAYS_DONE = re.compile(r"already|nothing (left )?to do|no steps? left|reached|up to date|complete|finished", re.I)
SAYS_NONFINITE = re.compile(r"non-?finite|not finite|diverg|skip", re.I)
SAYS_NO_SPACE = re.compile(
    r"space|too large|disk|quota|EFBIG|ENOSPC|errno|(could not|cannot|failed to|unable to) (write|save)", re.I
)
SUGGEST = re.compile(r"\b(use|try|pass|set|e\.g\.|for example|instead|did you mean|perhaps|such as|like)\b", re.I)


# --------------------------------------------------------------------------------------------
# processes


@dataclasses.dataclass
class Result:
    """One finished (or killed) subprocess: exit status, combined stdout+stderr, wall time."""

    rc: int | None  # None: killed at the timeout
    out: str
    elapsed: float
    log: Path

    @property
    def timed_out(self) -> bool:
        return self.rc is None

    @property
    def traceback(self) -> bool:
        return has_traceback(self.out)

    def brief(self) -> str:
        return "timed out" if self.timed_out else f"exit {self.rc}"


def _proc_table() -> dict[int, int]:
    """pid -> parent pid of every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                table[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return table


def descendants(pid: int) -> set[int]:
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for child, parent in table.items():
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def tagged(tag: str) -> set[int]:
    """Processes started by one case (torchrun starts its workers in new sessions: a process
    group kill misses them; the environment tag does not)."""
    needle = f"{TAG_VAR}={tag}".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    found.add(int(entry))
            except OSError:
                pass
    return found


def environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item)


def signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def kill_everything(proc: subprocess.Popen) -> None:
    """SIGCONT + SIGKILL the process, its descendants, its group and everything with its tag (one
    per started command: a case's other commands, e.g. a run it checks for interference, live on)."""
    pids = {proc.pid} | descendants(proc.pid) | tagged(proc._fm_tag)  # type: ignore[attr-defined]
    signal_all(pids, signal.SIGCONT)
    signal_all(pids, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def _strip_rank(line: str) -> str:
    return re.sub(r"^\[(default)?rank\d+\]:\s?", "", line)


def has_traceback(text: str) -> bool:
    """A Python traceback of the trainer. torchrun's own launcher traceback (printed whenever a
    worker exits non-zero, with frames only in torch.distributed's launcher) does not count."""
    lines = [_strip_rank(line) for line in text.splitlines()]
    for i, line in enumerate(lines):
        if "Traceback (most recent call last)" not in line:
            continue
        frames = []
        for following in lines[i + 1 : i + 400]:
            if following and not following[0].isspace():
                break
            match = re.match(r'\s*File "([^"]+)"', following)
            if match:
                frames.append(match.group(1))
        launcher = re.compile(r"^<frozen |torch/distributed/(run\.py|launcher/|elastic/)")
        if not frames or any(not launcher.search(frame) for frame in frames):
            return True
    return False


SCRATCH = ""  # the matrix's scratch root, set by main()


def message_lines(text: str, scrub: bool = True) -> str:
    """The output without the JSON config dump, Python warnings and paths of the scratch dir (keys
    such as "resume" in a printed config, or words in a path, are not a message)."""
    if scrub and SCRATCH:
        text = re.sub(re.escape(SCRATCH) + r"\S*", "PATH", text)
    keep = []
    for line in text.splitlines():
        s = _strip_rank(line).strip()
        if re.match(r'^("[^"]*"\s*:|[\[\]{}],?$)', s) or "Warning:" in s or s.startswith("warnings.warn"):
            continue
        keep.append(s)
    return "\n".join(keep)


# --------------------------------------------------------------------------------------------
# flags and the trainer's command line


def gbs(nproc: int) -> int:
    return 4 if nproc <= 2 else 2 * nproc


def base_flags(model: str = "vit", nproc: int = 1, mesh: str | None = None) -> dict[str, Any]:
    """A tiny run: 16x16 images, 2 steps, batch 4 (the CPU preset is 32x32, batch 16, 60 steps)."""
    flags: dict[str, Any] = {
        "--model": model,
        "--arch.img-size": ["16", "16"],
        "--max-steps": "2",
        "--data.global-batch-size": str(gbs(nproc)),
        "--metrics.log-every": "1",
    }
    if nproc > 1:
        flags["--mesh"] = mesh or f"1x{nproc}x1"
    return flags


def to_argv(flags: dict[str, Any]) -> list[str]:
    argv = []
    for flag, value in flags.items():
        argv.append(flag)
        argv.extend(value if isinstance(value, list) else [value])
    return argv


def flag_pattern(flag: str) -> str:
    """``--optim.lr``, ``optim.lr`` (and ``_`` for ``-`` inside names) name the flag."""
    name = flag.lstrip("-")
    body = "".join("[-_]" if c in "-_" else re.escape(c) for c in name)
    return rf"(?<![\w.])(?:--)?{body}(?![\w-])"


def names_flag(text: str, flag: str) -> bool:
    return re.search(flag_pattern(flag), text) is not None


def _as_float(token: str) -> float | None:
    try:
        return float(token.strip("()[],'\""))
    except ValueError:
        return None


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def suggests_value(text: str, flag: str, values: list[str]) -> bool:
    """Whether the output proposes the rejected value itself (``use --x 0`` after rejecting 0)."""
    wanted = [_as_float(v) for v in values]
    if any(w is None for w in wanted):
        return False
    count = len(wanted)
    pattern = flag_pattern(flag) + r"\s*[= ]\s*((?:[-+\w.()\[\]]+[\s,]*){" + str(count) + "})"
    for match in re.finditer(pattern, text):
        got = [_as_float(t) for t in re.split(r"[\s,]+", match.group(1).strip()) if t][:count]
        if len(got) != count or any(g is None for g in got) or not all(map(_same, got, wanted)):
            continue
        start = match.start()
        line_start = text.rfind("\n", 0, start) + 1
        clause = text[line_start:start]
        for sep in (";", ":", "("):
            clause = clause[clause.rfind(sep) + 1 :]
        if SUGGEST.search(clause):
            return True
    return False


# --------------------------------------------------------------------------------------------
# files


def step_of(path: Path) -> int | None:
    digits = re.findall(r"\d+", path.name)
    return int(digits[-1]) if digits else None


def ckpt_dirs(run: Path) -> list[Path]:
    """Checkpoint directories (DCP: they hold ``.metadata``) anywhere under ``run``, by step."""
    found = []
    for root, dirs, _ in os.walk(run):
        for d in dirs:
            path = Path(root) / d
            if (path / ".metadata").is_file() and not d.endswith(".tmp") and step_of(path) is not None:
                found.append(path)
    return sorted(found, key=lambda p: (step_of(p), str(p)))


def newest_ckpt(run: Path) -> Path:
    dirs = ckpt_dirs(run)
    if not dirs:
        raise HarnessError(f"no checkpoint found under {run}")
    return dirs[-1]


def ckpt_steps(run: Path) -> set[int]:
    return {step_of(p) for p in ckpt_dirs(run)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digest(path: Path) -> dict[str, str]:
    """relative path -> sha256 (or link target) of every file under ``path``."""
    out = {}
    if path.is_file():
        return {".": sha256(path)}
    for root, dirs, files in os.walk(path):
        for name in files + [d for d in dirs if (Path(root) / d).is_symlink()]:
            p = Path(root) / name
            rel = str(p.relative_to(path))
            out[rel] = "link:" + os.readlink(p) if p.is_symlink() else sha256(p)
    return out


def all_digests(run: Path) -> list[dict[str, str]]:
    """For each directory under ``run``: its files' names and hashes (to find a moved checkpoint)."""
    out = []
    for root, _, files in os.walk(run):
        out.append({name: sha256(Path(root) / name) for name in files if not (Path(root) / name).is_symlink()})
    return out


def preserved_somewhere(run: Path, original: dict[str, str]) -> bool:
    """The files of a checkpoint dir (names and contents) exist together in some dir under ``run``."""
    flat = {k: v for k, v in original.items() if "/" not in k}
    return any(all(d.get(k) == v for k, v in flat.items()) for d in all_digests(run))


def jsonl_records(run: Path) -> dict[Path, list[dict]]:
    out = {}
    for path in run.rglob("*.jsonl"):
        if not path.is_file():
            continue
        records = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                records.append(value)
        out[path] = records
    return out


MARK_KEYS = ("event", "resume", "resumed", "restart", "run_start", "start", "segment", "session")


def duplicated_steps(run: Path) -> list[str]:
    """Step records that repeat (or go back) with no record in between that marks a new segment
    (a record without ``step``, or one with an event/resume-like key)."""
    problems = []
    for path, records in jsonl_records(run).items():
        last = None
        for rec in records:
            if "step" not in rec or any(k in rec for k in MARK_KEYS):
                last = None
                continue
            step = rec.get("step")
            if not isinstance(step, (int, float)):
                continue
            if last is not None and step <= last:
                problems.append(f"{path.name}: step {step} after {last}")
            last = step
    return problems


def max_logged_step(run: Path, log: Path | None = None) -> int:
    best = 0
    for records in jsonl_records(run).values():
        for rec in records:
            if isinstance(rec.get("step"), int):
                best = max(best, rec["step"])
    if log is not None and log.exists():
        for match in re.finditer(r"\bstep\s+(\d+)\s*/\s*\d+", log.read_text(errors="replace")):
            best = max(best, int(match.group(1)))
    return best


class _Exec:
    """Unpickling this runs a shell command (the classic pickle payload)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def payload(marker: Path) -> bytes:
    return pickle.dumps(_Exec(f"touch {shlex.quote(str(marker))}"), protocol=2)


HASHES = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "blake2b", "blake2s", "sha3_256")


def file_info(path: Path) -> tuple[int, dict[str, str]]:
    data = path.read_bytes()
    return len(data), {alg: hashlib.new(alg, data).hexdigest() for alg in HASHES}


def snapshot(run: Path) -> dict[Path, tuple[int, dict[str, str]]]:
    return {p: file_info(p) for p in run.rglob("*") if p.is_file() and not p.is_symlink()}


def rehash_manifests(run: Path, before: dict[Path, tuple[int, dict[str, str]]]) -> list[str]:
    """What an attacker does next: in every text file under ``run`` replace the old hash of each
    changed file by its new one (and, in JSON, its old size by the new size: next to the hash or
    under the file's name). Rewritten manifests are themselves changed files: repeat until none."""
    queue = [p for p, info in before.items() if p.is_file() and file_info(p) != info]
    rewritten: list[str] = []
    rounds = 0
    while queue and rounds < 20:
        rounds += 1
        changed = queue.pop(0)
        old_size, old = before[changed]
        new_size, new = file_info(changed)
        for other in sorted(p for p in run.rglob("*") if p.is_file() and not p.is_symlink() and p != changed):
            if other.stat().st_size > 8 << 20:
                continue
            try:
                text = other.read_text()
            except (UnicodeDecodeError, OSError):
                continue
            updated = text
            for alg in HASHES:
                updated = re.sub(re.escape(old[alg]), new[alg], updated, flags=re.I)
            if other.suffix == ".json":
                try:
                    data = json.loads(updated)
                except ValueError:
                    data = None
                if data is not None and _fix_sizes(data, changed, old_size, new_size, set(new.values())):
                    updated = json.dumps(data, indent=2)
            if updated != text:
                other.write_text(updated)
                rewritten.append(str(other.relative_to(run)))
                if other in before and other not in queue:
                    queue.append(other)
    return rewritten


def _fix_sizes(data: Any, changed: Path, old_size: int, new_size: int, new_hashes: set[str]) -> bool:
    fixed = False
    if isinstance(data, dict):
        holds_hash = any(isinstance(v, str) and any(h in v.lower() for h in new_hashes) for v in data.values())
        for key, value in list(data.items()):
            names_file = isinstance(key, str) and key and (str(changed).endswith(key) or key == changed.name)
            if (
                isinstance(value, int)
                and not isinstance(value, bool)
                and value == old_size
                and (holds_hash or names_file)
            ):
                data[key] = new_size
                fixed = True
            else:
                fixed |= _fix_sizes(value, changed, old_size, new_size, new_hashes)
    elif isinstance(data, list):
        for item in data:
            fixed |= _fix_sizes(item, changed, old_size, new_size, new_hashes)
    return fixed


FINITE_CHECK = r"""
import json, math, sys, warnings
warnings.filterwarnings("ignore")
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

def walk(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from walk(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from walk(v)
    else:
        yield obj

report = {}
for path in sys.argv[1:]:
    try:
        sd = {}
        _load_state_dict(sd, storage_reader=dcp.FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
        bad = 0
        for v in walk(sd):
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                bad += 1
            elif isinstance(v, float) and not math.isfinite(v):
                bad += 1
        report[path] = bad
    except Exception as err:
        report[path] = "unreadable: " + type(err).__name__
print(json.dumps(report))
"""


# --------------------------------------------------------------------------------------------
# cases


class HarnessError(Exception):
    """The matrix itself could not set a case up (reported as a FAIL with this reason)."""


@dataclasses.dataclass
class Case:
    category: str
    name: str
    fn: Callable[..., tuple[bool, str]]
    kwargs: dict = dataclasses.field(default_factory=dict)
    slow: bool = False


class Matrix:
    """Shared state: options, scratch root, the trainer's --help, base runs (built once)."""

    def __init__(self, root: Path, nproc: int):
        self.root, self.nproc = root, nproc
        self._templates: dict[str, Path] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self.help = ""
        self.help_flags: set[str] = set()

    def load_help(self) -> None:
        ctx = Ctx(self, self.root / "help")
        res = ctx.run(["--help"], timeout=120, env={"COLUMNS": "250"})
        self.help = res.out
        self.help_flags = set(re.findall(r"--[a-z][\w.-]*[\w]", res.out))
        if res.rc != 0 or "--max-steps" not in self.help_flags:
            raise HarnessError(f"recipes/train.py --help failed ({res.brief()}):\n{res.out[-2000:]}")

    TEMPLATES = {
        # name: (model, nproc, extra flags)
        "vit1": ("vit", 1, {"--max-steps": "2", "--checkpoint.every": "1"}),
        "mae2": ("mae", 2, {"--max-steps": "2", "--checkpoint.every": "1"}),
        "other": ("vit", 1, {"--max-steps": "3", "--checkpoint.every": "3", "--run.seed": "1"}),
        "vit3": ("vit", 1, {"--max-steps": "3", "--checkpoint.every": "1", "--checkpoint.keep": "3"}),
    }

    def template_flags(self, name: str) -> tuple[dict[str, Any], int]:
        model, nproc, extra = self.TEMPLATES[name]
        nproc = self.nproc if nproc > 1 else 1
        return {**base_flags(model, nproc), **extra}, nproc

    def template(self, name: str) -> Path:
        """A finished run directory of template ``name`` (built on first use)."""
        with self._lock:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if name not in self._templates:
                flags, nproc = self.template_flags(name)
                ctx = Ctx(self, self.root / "templates" / name)
                run = ctx.dir / "run"
                res = ctx.run({**flags, "--run.dir": str(run), "--checkpoint.resume": "none"}, nproc=nproc)
                if res.rc != 0 or not ckpt_dirs(run):
                    raise HarnessError(f"base run {name} failed ({res.brief()}): {res.out[-1500:]}")
                self._templates[name] = run
            return self._templates[name]


class Ctx:
    """One case's scratch directory and its subprocesses."""

    def __init__(self, matrix: Matrix, path: Path):
        self.m = matrix
        self.dir = path
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tag = uuid.uuid4().hex
        self.count = 0

    def command(self, argv: list[str], nproc: int) -> list[str]:
        if nproc > 1:
            launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
            return [sys.executable, *launcher, str(TRAIN), *argv]
        return [sys.executable, str(TRAIN), *argv]

    def start(
        self, args: dict | list, nproc: int = 1, fsize: int | None = None, env: dict | None = None
    ) -> tuple[subprocess.Popen, Path]:
        argv = to_argv(args) if isinstance(args, dict) else list(args)
        cmd = self.command(argv, nproc)
        if fsize is not None:  # a disk that fills up: writes beyond fsize bytes fail with EFBIG
            limit = (
                f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize})); "
                "os.execv(sys.argv[1], sys.argv[1:])"
            )
            cmd = [sys.executable, "-c", limit, *cmd]
        full_env = dict(os.environ)
        full_env.setdefault("OMP_NUM_THREADS", "1")
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        full_env["PYTHONUNBUFFERED"] = "1"
        self.count += 1
        full_env[TAG_VAR] = f"{self.tag}.{self.count}"
        full_env.update(env or {})
        log = self.dir / f"{self.count:02d}.log"
        with open(log, "w") as f:
            f.write("$ " + shlex.join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(
                cmd,
                cwd=self.dir,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc._fm_start = time.monotonic()  # type: ignore[attr-defined]
        proc._fm_tag = full_env[TAG_VAR]  # type: ignore[attr-defined]
        return proc, log

    def finish(self, proc: subprocess.Popen, log: Path, timeout: float) -> Result:
        start = proc._fm_start  # type: ignore[attr-defined]
        try:
            rc: int | None = proc.wait(timeout=max(0.1, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            rc = None
        elapsed = time.monotonic() - start
        kill_everything(proc)  # stragglers (torchrun workers) even after a clean exit
        text = log.read_text(errors="replace")
        return Result(rc=rc, out=text.split("\n", 1)[1] if "\n" in text else "", elapsed=elapsed, log=log)

    def run(self, args: dict | list, nproc: int = 1, timeout: float = TIMEOUT, **kw) -> Result:
        proc, log = self.start(args, nproc=nproc, **kw)
        try:
            return self.finish(proc, log, timeout)
        finally:
            kill_everything(proc)

    def copy_template(self, name: str, dest: str = "run") -> tuple[Path, dict[str, Any], int]:
        src = self.m.template(name)
        run = self.dir / dest
        shutil.copytree(src, run, symlinks=True)
        flags, nproc = self.m.template_flags(name)
        return run, {**flags, "--run.dir": str(run)}, nproc

    def wait_for_step(self, proc: subprocess.Popen, run: Path, log: Path, step: int, limit: float) -> int:
        """Poll until the run has logged ``step`` (returns the step seen; 0 if it ended or timed out)."""
        end = time.monotonic() + limit
        while time.monotonic() < end:
            seen = max_logged_step(run, log)
            if seen >= step:
                return seen
            if proc.poll() is not None:
                return 0
            time.sleep(0.05)
        return 0


def judge(problems: list[str], good: str) -> tuple[bool, str]:
    return (not problems, "; ".join(problems) if problems else good)


def refusal_problems(res: Result) -> list[str]:
    """A clean refusal: non-zero exit before the timeout, without a traceback."""
    problems = []
    if res.timed_out:
        problems.append(f"no exit within {res.elapsed:.0f} s")
    elif res.rc == 0:
        problems.append("exit 0 (went ahead)")
    if res.traceback:
        problems.append("traceback")
    return problems


def success_problems(res: Result, what: str = "run") -> list[str]:
    problems = []
    if res.timed_out:
        problems.append(f"{what} did not finish within {res.elapsed:.0f} s")
    elif res.rc != 0:
        problems.append(f"{what} failed ({res.brief()}): {last_line(res.out)}")
    if res.traceback:
        problems.append(f"{what}: traceback")
    return problems


def last_line(text: str) -> str:
    lines = [line for line in message_lines(text).splitlines() if line.strip()]
    return lines[-1][:160] if lines else ""


# ---- bad_flags ------------------------------------------------------------------------------


def bad_flag(ctx: Ctx, model: str, flag: str, values: list[str]) -> tuple[bool, str]:
    """Handled well: non-zero exit in time, no traceback, the output names the flag, does not
    propose the rejected value, and --run.dir was not created."""
    run = ctx.dir / "run"
    res = ctx.run({**base_flags(model), "--run.dir": str(run), flag: values}, timeout=FLAG_TIMEOUT)
    problems = refusal_problems(res)
    if not names_flag(message_lines(res.out, scrub=False), flag):
        problems.append(f"message does not name {flag}" + (f" ({last_line(res.out)})" if res.rc else ""))
    if suggests_value(message_lines(res.out, scrub=False), flag, values):
        problems.append("suggests the rejected value")
    if run.exists():
        problems.append("created --run.dir")
    return judge(problems, f"refused: {last_line(res.out)}")


BAD_FLAGS: list[tuple[str, str, list[str]]] = []


def _bad(model: str, flag: str, *values: str) -> None:
    for value in values:
        BAD_FLAGS.append((model, flag, value.split()))


_bad("vit", "--max-steps", "0", "-3")
_bad("vit", "--data.global-batch-size", "0", "-4")
_bad("vit", "--data.micro-batch-size", "0", "-2", "3")
_bad("vit", "--data.num-classes", "0", "-1")
_bad("vit", "--optim.lr", "-0.001", "nan", "inf")
_bad("vit", "--optim.weight-decay", "-0.1", "nan")
_bad("vit", "--optim.betas", "1.0 0.95", "0.9 1.5", "-0.1 0.95")
_bad("vit", "--optim.eps", "-1e-8", "nan")
_bad("vit", "--optim.grad-clip", "-1", "nan")
_bad("vit", "--schedule.warmup-steps", "-1")
_bad("vit", "--schedule.warmup-start-lr", "-0.001", "nan")
_bad("vit", "--schedule.min-lr", "nan", "1.0")  # 1.0 > the peak lr
_bad("vit", "--checkpoint.every", "-1")
_bad("vit", "--checkpoint.keep", "0", "-1")
_bad("vit", "--metrics.log-every", "0", "-1")
_bad("vit", "--run.seed", "-1", str(2**64))
_bad("vit", "--arch.in-chans", "0", "-1")
_bad("vit", "--arch.patch-size", "0", "5", "32")  # 5 does not divide 16; 32 > the image
_bad("vit", "--arch.img-size", "0 0", "-16 -16", "18 18")  # 18 is not a multiple of the patch (4)
_bad("vit", "--arch.embed-dim", "0", "60")  # 60 is not divisible by the 8 heads
_bad("vit", "--arch.depth", "-1")
_bad("vit", "--arch.num-heads", "0", "3")  # 3 does not divide the width 64
_bad("vit", "--arch.mlp-ratio", "-1", "nan")
for _flag in ("drop-path-rate", "attn-drop-rate", "proj-drop-rate", "pos-drop-rate", "drop-rate", "patch-drop-rate"):
    _bad("vit", f"--arch.{_flag}", "-0.1", "1.0")
_bad("vit", "--arch.drop-path-rate", "nan")
_bad("mae", "--arch.mask-ratio", "-0.1", "1.0", "nan")
_bad("vit", "--arch.init-values", "nan", "inf")
_bad("vit", "--arch.num-classes", "0", "-1", "2")  # 2 < the 3 classes of the data
_bad("mae", "--arch.decoder-embed-dim", "0", "-32")
_bad("mae", "--arch.decoder-depth", "-1")
_bad("mae", "--arch.decoder-num-heads", "0", "3")
_bad("mae", "--arch.decoder-mlp-ratio", "-1", "nan")
_bad("unetr", "--arch.feature-size", "0", "-8")
_bad("diffusion", "--arch.time-steps", "0", "-1")


# ---- code_exec ------------------------------------------------------------------------------


def _resume_flags(flags: dict, resume: str, ckpt: Path, **extra: str) -> dict:
    return {**flags, "--max-steps": "3", **extra, "--checkpoint.resume": "auto" if resume == "auto" else str(ckpt)}


def code_exec(ctx: Ctx, nproc: int, attack: str, resume: str, rehash: bool) -> tuple[bool, str]:
    """Plant a pickle whose unpickling runs ``touch MARKER`` into the newest checkpoint and resume.
    Handled well: MARKER never appears, and the resume refuses (non-zero exit, no traceback,
    naming the planted file). Attack ``other``: every other (non-tensor) file of the checkpoint
    dir, one at a time; with ``auto``, also the files beside the checkpoint dirs (e.g. a
    ``latest`` pointer; for those a run that carries on but names the file is also fine).
    ``rehash``: the attacker also rewrites any hash/size manifest under the run dir."""
    template = "vit1" if nproc == 1 else "mae2"
    probe, _, _ = ctx.copy_template(template, "probe")
    ck = newest_ckpt(probe)
    if attack == "metadata":
        targets = [ck / ".metadata"]
    elif attack == "shard":
        targets = sorted(ck.glob("*.distcp"))[:1]
    else:
        targets = sorted(p for p in ck.iterdir() if p.is_file() and p.name != ".metadata" and p.suffix != ".distcp")
        if resume == "auto":
            targets += sorted(p for p in ck.parent.iterdir() if p.is_file() and not p.is_symlink())
    if not targets:
        raise HarnessError(f"nothing to attack for {attack} in {ck}")
    problems, notes = [], []
    for i, target in enumerate(targets):
        run, flags, n = ctx.copy_template(template, f"run{i}")
        target = run / target.relative_to(probe)
        ckpt = run / ck.relative_to(probe)
        marker = ctx.dir / f"MARKER{i}"
        before = snapshot(run) if rehash else {}
        data = payload(marker)
        if attack == "shard":  # overwrite the start of the shard (where DCP puts its pickled items)
            with open(target, "r+b") as f:
                f.write(data)
        else:
            target.write_bytes(data)
        if rehash:
            rewritten = rehash_manifests(run, before)
            notes.append(f"rehashed {rewritten}" if rewritten else "no manifest found")
        res = ctx.run(_resume_flags(flags, resume, ckpt), nproc=n)
        beside = target.parent != ckpt
        where = str(target.relative_to(run))
        own = []
        if marker.exists():
            own.append("MARKER created: code executed")
        if res.timed_out:
            own.append("timed out")
        elif res.rc == 0 and not beside:
            own.append("resumed from it (exit 0)")
        if res.traceback:
            own.append("traceback")
        if target.name not in message_lines(res.out, scrub=False):
            own.append("file not named")
        if own:
            problems.append(f"{where}: {', '.join(own)}")
    note = f" ({notes[0]})" if notes else ""
    return judge(problems, f"refused for {[str(t.relative_to(probe)) for t in targets]}{note}")


def control(ctx: Ctx, nproc: int) -> tuple[bool, str]:
    """Not an attack: a copied base run resumes (the other cases rely on copies being resumable)."""
    run, flags, n = ctx.copy_template("vit1" if nproc == 1 else "mae2")
    res = ctx.run({**flags, "--max-steps": "3", "--checkpoint.resume": "auto"}, nproc=n)
    return judge(success_problems(res, "resume"), "untampered copy resumes")


# ---- integrity ------------------------------------------------------------------------------


def _shard(ck: Path, last: bool = False) -> Path:
    shards = sorted(ck.glob("*.distcp"))
    if not shards:
        raise HarnessError(f"no .distcp shard in {ck}")
    return shards[-1] if last else shards[0]


def _named_json(ck: Path, word: str, default: str) -> Path:
    hits = sorted(p for p in ck.glob(f"*{word}*.json"))
    return hits[0] if hits else ck / default


def damage(ctx: Ctx, nproc: int, how: str, resume: str) -> tuple[bool, str]:
    """Damage the newest checkpoint and resume. Handled well: refuses (non-zero exit, no
    traceback) naming the damaged file or the problem (corrupt, checksum, missing, ...)."""
    run, flags, n = ctx.copy_template("vit1" if nproc == 1 else "mae2")
    ck = newest_ckpt(run)
    if how == "flip-shard-middle":
        target = _shard(ck, last=nproc > 1)
        data = bytearray(target.read_bytes())
        mid = len(data) // 2
        data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
        target.write_bytes(bytes(data))
    elif how == "truncate-shard":
        target = _shard(ck, last=nproc > 1)
        os.truncate(target, target.stat().st_size // 2)
    elif how == "delete-shard":
        target = _shard(ck, last=nproc > 1)
        target.unlink()
    elif how == "delete-metadata":
        target = ck / ".metadata"
        target.unlink()
    elif how == "flip-metadata":
        target = ck / ".metadata"
        data = bytearray(target.read_bytes())
        mid = len(data) // 2
        data[mid : mid + 32] = bytes(b ^ 0xFF for b in data[mid : mid + 32])
        target.write_bytes(bytes(data))
    elif how == "state-garbage":
        target = _named_json(ck, "state", "trainer_state.json")
        target.write_text("{not json at all")
    elif how == "state-wrong-fields":
        target = _named_json(ck, "state", "trainer_state.json")
        target.write_text('{"step": "seven", "data_positions": -1}')
    elif how == "config-garbage":
        target = _named_json(ck, "config", "config.json")
        target.write_text("{not json at all")
    else:
        raise HarnessError(f"unknown damage {how}")
    res = ctx.run(_resume_flags(flags, resume, ck), nproc=n)
    problems = refusal_problems(res)
    if not (target.name in message_lines(res.out, scrub=False) or PROBLEM.search(message_lines(res.out))):
        problems.append(f"names neither {target.name} nor the problem")
    return judge(problems, f"refused: {last_line(res.out)}")


def foreign(ctx: Ctx, how: str) -> tuple[bool, str]:
    """Point the run at another (real, compatible) run's checkpoint: ``latest`` holding a path that
    leaves the run dir (relative or absolute), or a step dir that is a symlink into the other run.
    The other run is at step 3, this one at step 2; resuming to step 5 with a save every step.
    Handled well: no traceback, the other run is untouched, and the run does not silently continue
    from the other run's state (it refuses, or continues from its own step 2: a step-3 checkpoint
    of its own appears)."""
    run, flags, _ = ctx.copy_template("vit1")
    other, _, _ = ctx.copy_template("other", "other-run")
    other_ck = newest_ckpt(other)
    own_before = tree_digest(other)
    ck = newest_ckpt(run)
    pointer = ck.parent / "latest"
    if how == "latest-relative":
        rel = os.path.relpath(other_ck, pointer.parent)
        pointer.write_text(rel + "\n")
    elif how == "latest-absolute":
        pointer.write_text(str(other_ck) + "\n")
    else:  # the newest step dir replaced by a symlink of the same name
        shutil.rmtree(ck)
        ck.symlink_to(other_ck, target_is_directory=True)
    res = ctx.run(
        {
            **flags,
            "--max-steps": "5",
            "--checkpoint.every": "1",
            "--checkpoint.keep": "10",
            "--checkpoint.resume": "auto",
        }
    )
    problems = []
    if res.timed_out:
        problems.append("timed out")
    if res.traceback:
        problems.append("traceback")
    if tree_digest(other) != own_before:
        problems.append("the other run's files changed")
    if res.rc == 0 and 3 not in ckpt_steps(run):
        problems.append("silently continued from the other run's step-3 checkpoint")
    if res.rc == 0 and not problems:
        return True, "continued from its own checkpoint"
    return judge(problems, f"refused: {last_line(res.out)}")


# ---- run_dir --------------------------------------------------------------------------------


def fresh_over_checkpoints(ctx: Ctx) -> tuple[bool, str]:
    """--checkpoint.resume none into a run dir that has checkpoints. Handled well: refused with a
    message about the checkpoints/resume; the old checkpoints byte-identical."""
    run, flags, _ = ctx.copy_template("vit1")
    parent = newest_ckpt(run).parent
    before = tree_digest(parent)
    res = ctx.run({**flags, "--checkpoint.resume": "none"})
    problems = refusal_problems(res)
    if not re.search(r"checkpoint|resume", message_lines(res.out), re.I):
        problems.append("message mentions neither checkpoints nor resuming")
    if tree_digest(parent) != before:
        problems.append("old checkpoints changed")
    return judge(problems, f"refused: {last_line(res.out)}")


def fresh_into_metrics_only(ctx: Ctx) -> tuple[bool, str]:
    """A fresh run into a dir that holds only an earlier run's metrics.jsonl. Handled well: refused
    (clean), or it runs and the old log survives (its bytes are in some file under the run dir)
    and no log has repeated steps without a marker between the runs."""
    src = ctx.m.template("vit1") / "metrics.jsonl"
    run = ctx.dir / "run"
    run.mkdir()
    old = src.read_bytes()
    (run / "metrics.jsonl").write_bytes(old)
    res = ctx.run({**base_flags(), "--run.dir": str(run), "--checkpoint.resume": "none"})
    if res.rc not in (0, None) and not res.traceback:
        return True, f"refused: {last_line(res.out)}"
    problems = success_problems(res)
    if not any(old in p.read_bytes() for p in run.rglob("*") if p.is_file()):
        problems.append("old metrics lost")
    problems += duplicated_steps(run)[:2]
    return judge(problems, "ran; old log kept, steps not mixed")


def resume_older(ctx: Ctx, keep: str) -> tuple[bool, str]:
    """Resume by PATH from step 1 while steps 2 and 3 exist (with a different lr: a branch).
    Handled well: exit 0, the chosen checkpoint still there unchanged, and the newer checkpoints
    not lost (same files, same bytes, anywhere under the run dir); or a clean refusal that leaves
    everything intact and mentions the newer checkpoints."""
    run, flags, _ = ctx.copy_template("vit3")
    dirs = ckpt_dirs(run)
    if len(dirs) < 3:
        raise HarnessError(f"expected 3 checkpoints, found {[d.name for d in dirs]}")
    chosen, newer = dirs[0], dirs[1:]
    originals = {d.name: tree_digest(d) for d in dirs}
    res = ctx.run({**flags, "--checkpoint.keep": keep, "--optim.lr": "0.001", "--checkpoint.resume": str(chosen)})
    problems = []
    if res.traceback:
        problems.append("traceback")
    if res.timed_out:
        problems.append("timed out")
    if not chosen.is_dir() or tree_digest(chosen) != originals[chosen.name]:
        problems.append(f"chosen {chosen.name} gone or changed")
    lost = [d.name for d in newer if not preserved_somewhere(run, originals[d.name])]
    if lost:
        problems.append(f"newer checkpoints lost/overwritten: {lost}")
    if res.rc not in (0, None) and not problems:
        said = message_lines(res.out, scrub=False)
        if any(d.name in said for d in newer) or re.search(r"newer|later", message_lines(res.out), re.I):
            return True, f"refused, all intact: {last_line(res.out)}"
        problems.append("refused without mentioning the newer checkpoints")
    elif res.rc not in (0, None):
        problems.append(f"failed ({res.brief()})")
    return judge(problems, "branched; chosen and newer checkpoints kept")


def concurrent_runs(ctx: Ctx, second: str) -> tuple[bool, str]:
    """Start a long run, then a second run on the same dir. Handled well: the second is refused
    (clean, within 60 s, while the first is still running); the first finishes with exit 0 and a
    checkpoint that a later resume accepts."""
    run = ctx.dir / "run"
    flags = {
        **base_flags(),
        "--run.dir": str(run),
        "--max-steps": "400",
        "--checkpoint.every": "100",
        "--metrics.log-every": "10",
    }
    first, first_log = ctx.start({**flags, "--checkpoint.resume": "none"})
    try:
        if not ctx.wait_for_step(first, run, first_log, 10, TIMEOUT):
            return False, f"first run never got going ({first.poll()}): {last_line(first_log.read_text())}"
        res = ctx.run({**flags, "--checkpoint.resume": second}, timeout=60)
        first_alive = first.poll() is None
        problems = []
        if res.timed_out:
            problems.append("second run not refused within 60 s")
        elif res.rc == 0:
            problems.append("second run went ahead (exit 0)")
        if res.traceback:
            problems.append("second run: traceback")
        if problems:
            return judge(problems, "")
        if not first_alive:
            return False, "inconclusive: the first run had ended before the second was refused"
        first_res = ctx.finish(first, first_log, 2 * TIMEOUT)
        problems = success_problems(first_res, "first run")
        if not problems:
            check = ctx.run({**flags, "--max-steps": "401", "--checkpoint.resume": "auto"})
            problems = success_problems(check, "resume of the first run")
        return judge(problems, f"second refused: {last_line(res.out)}")
    finally:
        kill_everything(first)


def stale_tmp(ctx: Ctx, ahead: int) -> tuple[bool, str]:
    """A half-written ``step-N.tmp`` dir left by a crash beside the checkpoints (N = newest step +
    ``ahead``). Handled well: resume auto carries on to step 4 (exit 0, no traceback)."""
    run, flags, _ = ctx.copy_template("vit1")
    ck = newest_ckpt(run)
    digits = re.findall(r"\d+", ck.name)[-1]
    name = ck.name[: ck.name.rindex(digits)] + str(int(digits) + ahead).zfill(len(digits)) + ".tmp"
    tmp = ck.parent / name
    tmp.mkdir()
    (tmp / ".metadata").write_bytes(os.urandom(100))
    shard = _shard(ck)
    (tmp / shard.name).write_bytes(shard.read_bytes()[:1000])
    res = ctx.run({**flags, "--max-steps": "4", "--checkpoint.resume": "auto", "--checkpoint.keep": "10"})
    problems = success_problems(res, "resume")
    if not problems and 4 not in ckpt_steps(run):
        problems.append("no step-4 checkpoint")
    state = "removed" if not tmp.exists() else "ignored"
    return judge(problems, f"resumed; stale {name} {state}")


def metrics_after_crash(ctx: Ctx) -> tuple[bool, str]:
    """SIGKILL a run between checkpoints (logged steps past the last save), then resume auto.
    Handled well: the resume succeeds and no metrics log repeats steps without a resume marker."""
    run = ctx.dir / "run"
    flags = {**base_flags(), "--run.dir": str(run), "--max-steps": "200", "--checkpoint.every": "20"}
    proc, log = ctx.start({**flags, "--checkpoint.resume": "none"})
    try:
        end = time.monotonic() + TIMEOUT
        while time.monotonic() < end and proc.poll() is None:
            step = max_logged_step(run)
            if step >= 25 and 4 <= step % 20 <= 15:
                break
            time.sleep(0.02)
        else:
            return False, f"inconclusive: could not interrupt the run ({proc.poll()})"
    finally:
        kill_everything(proc)
    killed_at = max_logged_step(run)
    res = ctx.run({**flags, "--max-steps": str(killed_at + 5), "--checkpoint.resume": "auto"})
    problems = success_problems(res, "resume") + duplicated_steps(run)[:2]
    return judge(problems, f"killed after step {killed_at}; resumed; log has no repeated steps")


def blocked_path(ctx: Ctx, which: str) -> tuple[bool, str]:
    """``checkpoints`` is a regular file / ``metrics.jsonl`` is a directory. Handled well: refused
    before training (clean, naming it; no metrics records / no checkpoint written)."""
    run = ctx.dir / "run"
    run.mkdir()
    if which == "checkpoints":
        (run / "checkpoints").write_text("not a directory\n")
    else:
        (run / "metrics.jsonl").mkdir()
    res = ctx.run({**base_flags(), "--run.dir": str(run), "--checkpoint.every": "1", "--checkpoint.resume": "none"})
    problems = refusal_problems(res)
    if which not in message_lines(res.out, scrub=False):
        problems.append(f"{which} not named")
    trained = any(any("step" in r for r in recs) for recs in jsonl_records(run).values()) or ckpt_dirs(run)
    if trained:
        problems.append("trained before failing")
    return judge(problems, f"refused: {last_line(res.out)}")


def same_command_twice(ctx: Ctx) -> tuple[bool, str]:
    """The same command (no resume flag) twice. Handled well: both exit 0, and the second says
    what it did (resumed / continued / already done / fresh)."""
    run = ctx.dir / "run"
    flags = {**base_flags(), "--run.dir": str(run)}
    first = ctx.run(flags)
    problems = success_problems(first, "first run")
    if problems:
        return judge(problems, "")
    second = ctx.run(flags)
    problems = success_problems(second, "second run")
    if not problems and not SAYS_WHAT.search(message_lines(second.out)):
        problems.append("second run does not say whether it resumed or started fresh")
    return judge(problems, f"second run: {next(iter(SAYS_WHAT.findall(message_lines(second.out))), '')}")


def resume_at_max(ctx: Ctx) -> tuple[bool, str]:
    """Resume auto of a run that already reached --max-steps. Handled well: exit 0 and says so."""
    run, flags, _ = ctx.copy_template("vit1")
    res = ctx.run({**flags, "--checkpoint.resume": "auto"})
    problems = success_problems(res)
    if not problems and not SAYS_DONE.search(message_lines(res.out)):
        problems.append("does not say there is nothing left to do")
    return judge(problems, "says it is done")


# ---- divergence -----------------------------------------------------------------------------


def diverge(ctx: Ctx, model: str, nproc: int, extra: dict[str, str]) -> tuple[bool, str]:
    """A learning rate that makes the loss non-finite, saving every step. Handled well: no
    traceback, a message about non-finite values / divergence (stop or skip), and no checkpoint
    under the run dir holds a non-finite tensor (loaded with DCP in a separate process)."""
    run = ctx.dir / "run"
    flags = {
        **base_flags(model, nproc),
        "--run.dir": str(run),
        "--max-steps": "6",
        "--checkpoint.every": "1",
        "--checkpoint.keep": "10",
        "--schedule.warmup-steps": "0",
        **extra,
    }
    res = ctx.run(flags, nproc=nproc)
    problems = []
    if res.timed_out:
        problems.append("timed out")
    if res.traceback:
        problems.append("traceback")
    if not SAYS_NONFINITE.search(message_lines(res.out)):
        problems.append("no message about non-finite loss/divergence")
    dirs = ckpt_dirs(run)
    bad, unreadable = [], []
    if dirs:
        proc = subprocess.run(
            [sys.executable, "-c", FINITE_CHECK, *map(str, dirs)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        try:
            report = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError) as err:
            raise HarnessError(f"finite check failed: {proc.stderr[-500:]}") from err
        bad = [Path(p).name for p, v in report.items() if isinstance(v, int) and v]
        unreadable = [Path(p).name for p, v in report.items() if isinstance(v, str)]
    if bad:
        problems.append(f"non-finite tensors saved in {bad}")
    note = f"; unreadable (not counted): {unreadable}" if unreadable else ""
    return judge(problems, f"{res.brief()}, {len(dirs)} checkpoint(s) all finite{note}: {last_line(res.out)}")


# ---- hang -----------------------------------------------------------------------------------


def workers(proc: subprocess.Popen, tag: str) -> dict[int, int]:
    """LOCAL_RANK -> pid of the trainer processes of a torchrun job."""
    found = {}
    for pid in descendants(proc.pid) | tagged(tag):
        env = environ_of(pid)
        if "LOCAL_RANK" in env and pid != proc.pid:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"train.py" in cmdline and b"torch.distributed.run" not in cmdline:
                found[int(env["LOCAL_RANK"])] = pid
    return found


def hang(ctx: Ctx, model: str, mesh: str, rank: str, sig: str) -> tuple[bool, str]:
    """Multi-rank training; one worker gets SIGSTOP (a hung rank) or SIGKILL (a crashed one) once
    training runs. Handled well: the whole job ends with a non-zero exit within 120 s."""
    n = ctx.m.nproc
    run = ctx.dir / "run"
    flags = {
        **base_flags(model, n, mesh.replace("N", str(n))),
        "--run.dir": str(run),
        "--max-steps": "100000",
        "--checkpoint.resume": "none",
    }
    if "--run.collective-timeout" in ctx.m.help_flags:
        flags["--run.collective-timeout"] = "10"
    proc, log = ctx.start(flags, nproc=n)
    try:
        if not ctx.wait_for_step(proc, run, log, 2, TIMEOUT):
            return False, f"training never started ({proc.poll()}): {last_line(log.read_text())}"
        ranks = workers(proc, proc._fm_tag)  # type: ignore[attr-defined]
        target = ranks.get(n - 1 if rank == "last" else 0)
        if target is None:
            raise HarnessError(f"worker not found among {ranks}")
        os.kill(target, getattr(signal, sig))
        t0 = time.monotonic()
        try:
            rc = proc.wait(timeout=HANG_LIMIT)
        except subprocess.TimeoutExpired:
            return False, f"still running {HANG_LIMIT} s after {sig} of rank {rank}"
        took = time.monotonic() - t0
        if rc == 0:
            return False, f"exit 0 after {sig} of a rank ({took:.0f} s)"
        return True, f"ended with exit {rc} {took:.0f} s after {sig}"
    finally:
        kill_everything(proc)


# ---- misc -----------------------------------------------------------------------------------


def refused_naming(ctx: Ctx, args: list[str] | dict, tokens: list[str], nproc: int = 1, marker: Path | None = None):
    res = ctx.run(args, nproc=nproc, timeout=FLAG_TIMEOUT)
    problems = refusal_problems(res)
    said = message_lines(res.out, scrub=False)
    missing = [t for t in tokens if not (names_flag(said, t) if t.startswith("--") else t in said)]
    if missing:
        problems.append(f"does not name {missing}")
    if marker is not None and marker.exists():
        problems.append("MARKER created: code executed")
    return judge(problems, f"refused: {last_line(res.out)}")


def misc_simple(ctx: Ctx, what: str) -> tuple[bool, str]:
    """A plainly wrong command line. Handled well: clean refusal (non-zero exit, no traceback)
    naming the offending flag, value or path."""
    run = ctx.dir / "run"
    flags = {**base_flags(), "--run.dir": str(run)}
    if what == "resume-nonexistent":
        path = str(ctx.dir / "nonexistent" / "step-00000002")
        return refused_naming(ctx, {**flags, "--checkpoint.resume": path}, [path])
    if what == "resume-path-is-file":
        path = ctx.dir / "notes.txt"
        path.write_text("not a checkpoint\n")
        return refused_naming(ctx, {**flags, "--checkpoint.resume": str(path)}, [str(path)])
    if what == "resume-empty-dir":
        path = ctx.dir / "empty"
        path.mkdir()
        return refused_naming(ctx, {**flags, "--checkpoint.resume": str(path)}, [str(path)])
    if what == "resume-empty-string":
        return refused_naming(ctx, {**flags, "--checkpoint.resume": ""}, ["--checkpoint.resume"])
    if what == "run-dir-is-file":
        run.write_text("a file\n")
        return refused_naming(ctx, flags, [str(run)])
    if what == "unknown-model":
        return refused_naming(ctx, {**flags, "--model": "nosuchfamily"}, ["nosuchfamily"])
    if what == "unknown-flag":
        return refused_naming(ctx, {**flags, "--optim.lrr": "1"}, ["--optim.lrr"])
    if what == "mesh-vs-world":
        return refused_naming(ctx, {**flags, "--mesh": "1x2x1"}, ["--mesh"])
    if what == "mesh-garbage":
        return refused_naming(ctx, {**flags, "--mesh": "2by1"}, ["--mesh"])
    if what == "mesh-vs-nproc":
        n = ctx.m.nproc
        return refused_naming(ctx, {**base_flags("vit", n, "1x1x1"), "--run.dir": str(run)}, ["--mesh"], nproc=n)
    if what == "model-size-unknown":
        return refused_naming(ctx, {**flags, "--model-size": "colossal"}, ["colossal"])
    if what == "max-steps-float":
        return refused_naming(ctx, {**flags, "--max-steps": "2.5"}, ["--max-steps"])
    if what == "config-nonexistent":
        path = str(ctx.dir / "nope.json")
        return refused_naming(ctx, ["--config", path, "--run.dir", str(run)], [path])
    if what == "config-garbage":
        path = ctx.dir / "config.json"
        path.write_text("{not json")
        return refused_naming(ctx, ["--config", str(path), "--run.dir", str(run)], [str(path)])
    if what == "config-pickle":
        path, marker = ctx.dir / "config.json", ctx.dir / "MARKER"
        path.write_bytes(payload(marker))
        return refused_naming(ctx, ["--config", str(path), "--run.dir", str(run)], [str(path)], marker=marker)
    if what == "option-of-other-family":
        return refused_naming(ctx, {**flags, "--arch.mask-ratio": "0.5"}, ["--arch.mask-ratio"])
    raise HarnessError(f"unknown misc case {what}")


def read_only_run_dir(ctx: Ctx) -> tuple[bool, str]:
    """--run.dir under a directory nobody may write (chmod 555; immutable when we are root).
    Handled well: clean refusal naming the run dir (flag or path)."""
    ro = ctx.dir / "readonly"
    ro.mkdir()
    os.chmod(ro, 0o555)
    immutable = False
    try:
        probe = ro / "probe"
        try:
            probe.write_text("x")
            probe.unlink()
            writable = True
        except OSError:
            writable = False
        if writable and shutil.which("chattr"):
            immutable = subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode == 0
            try:
                probe.write_text("x")
                probe.unlink()
            except OSError:
                writable = False
        if writable:
            ro = Path("/sys/ucfvit-fault-matrix")  # not creatable even by root
        run = ro / "run"
        res = ctx.run({**base_flags(), "--run.dir": str(run)}, timeout=FLAG_TIMEOUT)
        problems = refusal_problems(res)
        said = message_lines(res.out, scrub=False)
        if not (str(run) in said or names_flag(said, "--run.dir")):
            problems.append("names neither --run.dir nor the path")
        return judge(problems, f"refused: {last_line(res.out)}")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(ctx.dir / "readonly")], capture_output=True)
        os.chmod(ctx.dir / "readonly", 0o755)


def resume_mismatch(ctx: Ctx, what: str) -> tuple[bool, str]:
    """Resume a checkpoint with an incompatible model. Handled well: clean refusal naming the
    differing option (both model names for a different family)."""
    run, flags, _ = ctx.copy_template("vit1")
    ck = newest_ckpt(run)
    if what == "depth-auto":
        return refused_naming(ctx, {**flags, "--arch.depth": "3", "--checkpoint.resume": "auto"}, ["depth"])
    return refused_naming(
        ctx, {**base_flags("mae"), "--run.dir": str(run), "--checkpoint.resume": str(ck)}, ["vit", "mae"]
    )


def sigterm(ctx: Ctx, nproc: int) -> tuple[bool, str]:
    """SIGTERM (preemption) to a running job (to torchrun for several ranks). Handled well: it
    ends within 60 s without a traceback, leaving a checkpoint that resume auto continues from."""
    run = ctx.dir / "run"
    flags = {**base_flags("vit", nproc), "--run.dir": str(run), "--max-steps": "100000", "--checkpoint.resume": "none"}
    proc, log = ctx.start(flags, nproc=nproc)
    try:
        if not ctx.wait_for_step(proc, run, log, 3, TIMEOUT):
            return False, f"training never started ({proc.poll()})"
        os.kill(proc.pid, signal.SIGTERM)
        res = ctx.finish(proc, log, (time.monotonic() - proc._fm_start) + 60)  # type: ignore[attr-defined]
    finally:
        kill_everything(proc)
    problems = []
    if res.timed_out:
        return False, "did not stop within 60 s of SIGTERM"
    if res.traceback:
        problems.append("traceback")
    steps = ckpt_steps(run)
    if not steps:
        problems.append("no checkpoint saved")
        return judge(problems, "")
    last = max(steps)
    again = ctx.run({**flags, "--max-steps": str(last + 2), "--checkpoint.resume": "auto"}, nproc=nproc)
    problems += success_problems(again, "resume")
    if not again.rc and last + 2 not in ckpt_steps(run):
        problems.append(f"resume did not reach step {last + 2}")
    return judge(problems, f"stopped ({res.brief()}) with step {last} saved; resumed")


def disk_full(ctx: Ctx) -> tuple[bool, str]:
    """Writes fail with EFBIG (RLIMIT_FSIZE 256 KiB, so the tensor shards do not fit) while
    saving. Handled well: clean non-zero exit naming the problem; afterwards (disk fine again)
    resume auto succeeds from the previous checkpoint."""
    run, flags, _ = ctx.copy_template("vit1")
    resume = {**flags, "--max-steps": "4", "--checkpoint.resume": "auto"}
    res = ctx.run(resume, fsize=256 << 10)
    problems = refusal_problems(res)
    if not SAYS_NO_SPACE.search(message_lines(res.out)):
        problems.append("does not name the write failure")
    again = ctx.run(resume)
    problems += success_problems(again, "resume afterwards")
    return judge(problems, f"failed cleanly: {last_line(res.out)}; resumed afterwards")


# --------------------------------------------------------------------------------------------


def build_cases(nproc: int) -> list[Case]:
    cases: list[Case] = []

    def add(category: str, name: str, fn: Callable, slow: bool = False, **kwargs: Any) -> None:
        cases.append(Case(category, name, fn, kwargs, slow))

    for model, flag, values in BAD_FLAGS:
        prefix = "" if model == "vit" else f"{model}:"
        add("bad_flags", f"{prefix}{flag[2:]}={' '.join(values)}", bad_flag, model=model, flag=flag, values=values)

    for n in (1, nproc):
        add("code_exec", f"control-untampered-{n}rank", control, nproc=n)
        for attack in ("metadata", "shard", "other"):
            for resume in ("auto", "path"):
                for rehash in (False, True):
                    name = f"{attack}-{resume}{'-rehash' if rehash else ''}-{n}rank"
                    add("code_exec", name, code_exec, nproc=n, attack=attack, resume=resume, rehash=rehash)

    for how, n, resume in (
        ("flip-shard-middle", 1, "auto"),
        ("flip-shard-middle", 1, "path"),
        ("flip-shard-middle", nproc, "auto"),
        ("truncate-shard", 1, "auto"),
        ("truncate-shard", nproc, "auto"),
        ("delete-shard", 1, "auto"),
        ("delete-shard", nproc, "auto"),
        ("delete-metadata", 1, "auto"),
        ("delete-metadata", 1, "path"),
        ("flip-metadata", 1, "auto"),
        ("state-garbage", 1, "auto"),
        ("state-garbage", 1, "path"),
        ("state-wrong-fields", 1, "auto"),
        ("config-garbage", 1, "auto"),
    ):
        add("integrity", f"{how}-{resume}-{n}rank", damage, nproc=n, how=how, resume=resume)
    for how in ("latest-relative", "latest-absolute", "step-dir-symlink"):
        add("integrity", f"{how}-to-other-run", foreign, how=how)

    add("run_dir", "fresh-over-checkpoints", fresh_over_checkpoints)
    add("run_dir", "fresh-into-dir-with-only-metrics", fresh_into_metrics_only)
    add("run_dir", "resume-older-by-path-keep3", resume_older, keep="3")
    add("run_dir", "resume-older-by-path-keep2", resume_older, keep="2")
    add("run_dir", "concurrent-same-command", concurrent_runs, slow=True, second="none")
    add("run_dir", "concurrent-resume-auto", concurrent_runs, slow=True, second="auto")
    add("run_dir", "stale-tmp-next-step", stale_tmp, ahead=1)
    add("run_dir", "stale-tmp-far-step", stale_tmp, ahead=7)
    add("run_dir", "metrics-after-crash-resume", metrics_after_crash)
    add("run_dir", "checkpoints-is-a-file", blocked_path, which="checkpoints")
    add("run_dir", "metrics-jsonl-is-a-dir", blocked_path, which="metrics.jsonl")
    add("run_dir", "same-command-twice", same_command_twice)
    add("run_dir", "resume-at-max-steps", resume_at_max)

    add("divergence", "vit-lr1e6", diverge, model="vit", nproc=1, extra={"--optim.lr": "1e6"})
    add(
        "divergence",
        "vit-lr1e4-noclip",
        diverge,
        model="vit",
        nproc=1,
        extra={"--optim.lr": "1e4", "--optim.grad-clip": "0"},
    )
    add("divergence", "mae-lr1e6", diverge, model="mae", nproc=1, extra={"--optim.lr": "1e6"})
    add("divergence", f"mae-lr1e6-{nproc}rank", diverge, model="mae", nproc=nproc, extra={"--optim.lr": "1e6"})

    for name, model, mesh, rank, sig in (
        ("sigstop-last-rank-fsdp", "mae", "1xNx1", "last", "SIGSTOP"),
        ("sigstop-rank0-fsdp", "mae", "1xNx1", "first", "SIGSTOP"),
        ("sigstop-last-rank-ddp", "vit", "Nx1x1", "last", "SIGSTOP"),
        ("sigkill-last-rank-fsdp", "mae", "1xNx1", "last", "SIGKILL"),
    ):
        add("hang", name, hang, slow=True, model=model, mesh=mesh, rank=rank, sig=sig)

    for what in (
        "resume-nonexistent",
        "resume-path-is-file",
        "resume-empty-dir",
        "resume-empty-string",
        "run-dir-is-file",
        "unknown-model",
        "unknown-flag",
        "mesh-vs-world",
        "mesh-garbage",
        "mesh-vs-nproc",
        "model-size-unknown",
        "max-steps-float",
        "config-nonexistent",
        "config-garbage",
        "config-pickle",
        "option-of-other-family",
    ):
        add("misc", what, misc_simple, what=what)
    add("misc", "run-dir-under-read-only-dir", read_only_run_dir)
    add("misc", "resume-different-depth-auto", resume_mismatch, what="depth-auto")
    add("misc", "resume-different-model-path", resume_mismatch, what="model-path")
    add("misc", "sigterm-1rank", sigterm, nproc=1)
    add("misc", f"sigterm-{nproc}rank", sigterm, nproc=nproc)
    add("misc", "disk-full-during-save", disk_full)
    return cases


def run_case(matrix: Matrix, index: int, case: Case) -> tuple[bool, str, float]:
    ctx = Ctx(matrix, matrix.root / "cases" / f"{index:03d}")  # no case name in paths the trainer may print
    start = time.monotonic()
    try:
        ok, reason = case.fn(ctx, **case.kwargs)
    except HarnessError as err:
        ok, reason = False, f"harness: {err}"
    except Exception as err:  # a bug in the matrix must not stop the other cases
        ok, reason = False, f"harness error: {type(err).__name__}: {err} [{traceback.format_exc(limit=-2)!r}]"
    return ok, reason, time.monotonic() - start


def _unflag(path: Path) -> None:
    """Undo chattr +i left under ``path`` (so it can be removed)."""
    if shutil.which("chattr"):
        for p in path.rglob("readonly"):
            subprocess.run(["chattr", "-i", str(p)], capture_output=True)
            os.chmod(p, 0o755)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run one category (comma-separated for several)")
    parser.add_argument("--match", help="run only cases whose name contains this")
    parser.add_argument("--jobs", type=int, default=2, help="cases in parallel (default 2)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks of the multi-rank cases (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (printed at the end)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.nproc < 2:
        parser.error("--jobs must be >= 1 and --nproc >= 2")

    cases = build_cases(args.nproc)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {c.category for c in cases}
        if unknown:
            parser.error(f"--only: unknown categories {sorted(unknown)}")
        cases = [c for c in cases if c.category in wanted]
    if args.match:
        cases = [c for c in cases if args.match in c.name]
    if args.list:
        for c in cases:
            print(f"{c.category} {c.name}")
        return 0

    global SCRATCH
    root = Path(tempfile.mkdtemp(prefix="fault-matrix-"))
    SCRATCH = str(root)
    matrix = Matrix(root, args.nproc)
    start = time.monotonic()
    try:
        matrix.load_help()
        listed = [
            c for c in cases if c.category != "bad_flags" or c.kwargs["flag"] in matrix.help_flags
        ]  # a flag the trainer no longer has is no case
        for c in cases:
            if c not in listed:
                print(f"SKIP {c.category} {c.name}: {c.kwargs['flag']} not in --help", file=sys.stderr)
        cases = listed
        order = sorted(range(len(cases)), key=lambda i: not cases[i].slow)  # long ones first
        results: dict[int, tuple[bool, str, float]] = {}
        lock = threading.Lock()
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(run_case, matrix, i, cases[i]): i for i in order}
            for future in concurrent.futures.as_completed(futures):
                i = futures[future]
                ok, reason, took = results[i] = future.result()
                with lock:
                    case = cases[i]
                    verdict = "PASS" if ok else "FAIL"
                    print(f"{verdict} {case.category} {case.name}: {reason} [{took:.0f}s]", file=sys.stderr, flush=True)
    finally:
        if args.keep:
            print(f"scratch kept in {root}", file=sys.stderr)
        else:
            _unflag(root)
            shutil.rmtree(root, ignore_errors=True)

    by_category: dict[str, list[int]] = {}
    for i, case in enumerate(cases):
        tally = by_category.setdefault(case.category, [0, 0])
        tally[0] += 1
        tally[1] += results[i][0]
    summary = {
        "cases": len(cases),
        "handled_well": sum(ok for ok, _, _ in results.values()),
        "by_category": by_category,
        "failed": [f"{cases[i].category}/{cases[i].name}" for i in range(len(cases)) if not results[i][0]],
    }
    print(f"fault matrix: {time.monotonic() - start:.0f} s with --jobs {args.jobs}", file=sys.stderr)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
