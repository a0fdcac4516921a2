"""What the acceptance cases share: trainer subprocesses and killing them, scratch dirs, output scrubbing,
checkpoint files, and the judging helpers.

A case is a function ``fn(ctx, **kwargs) -> (handled_well, reason)``; its docstring says what handling it
well means. ``run_case`` gives it a fresh scratch dir and turns an exception of the harness into a FAIL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "recipes" / "train.py"
RECORD_EXIT = REPO / "tests" / "record_exit.py"
TAG_VAR = "UCFVIT_ACCEPTANCE_TAG"
TIMEOUT = 240  # hard limit of one trainer subprocess (s)
FLAG_TIMEOUT = 120  # ... of one refused command line (a bad flag that is accepted trains 2 tiny steps)
PROBLEM = re.compile(
    r"corrupt|checksum|hash|digest|mismatch|integrity|damaged|truncat|missing|incomplete|invalid|not found|"
    r"does not exist|no such file|unreadable|cannot (read|load|open)|could not (read|load|open)|"
    r"failed to (read|load|open)|unexpected|malformed|size|no (complete|valid|usable)",
    re.I,
)

LAUNCHER_LOG = re.compile(r"^[IWE]\d{4} \S+ +\d+ torch/distributed/")  # torchrun's own log lines

# The scratch root of the matrix in this process (set by Matrix): its paths are scrubbed from messages.
SCRATCH = ""


class HarnessError(Exception):
    """The harness itself could not set a case up (reported as a FAIL with this reason)."""


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


def exit_statuses(exit_dir: Path) -> dict[int, str]:
    """rank -> exit status written by tests/record_exit.py (a rank missing died of a signal)."""
    return {int(p.name.split("-")[1]): p.read_text().strip() for p in exit_dir.glob("rank-*")}


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
    """Processes started by one command (torchrun starts its workers in new sessions: a process
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


def signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def kill_everything(proc: subprocess.Popen) -> None:
    """SIGCONT + SIGKILL the process, its descendants, its group and everything with its tag (one
    per started command: a case's other commands, e.g. a run it checks for interference, live on)."""
    pids = {proc.pid} | descendants(proc.pid) | tagged(proc._acc_tag)  # type: ignore[attr-defined]
    signal_all(pids, signal.SIGCONT)
    signal_all(pids, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def undo_immutable(root: Path) -> None:
    """Undo a ``chattr +i`` left on a ``readonly`` dir under ``root`` by a killed case (so it can be removed)."""
    if shutil.which("chattr"):
        for p in root.rglob("readonly"):
            subprocess.run(["chattr", "-i", str(p)], capture_output=True)
            os.chmod(p, 0o755)


# --------------------------------------------------------------------------------------------
# output


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


def last_line(text: str) -> str:
    """The trainer's last word, for reasons: the last line that says something. torchrun's report of a
    failed worker (its log lines, its traceback, its summary) is not the trainer's, and a framed message
    (a box of ``│`` lines) is summed up by its first line."""
    lines = message_lines(text).splitlines()
    if any(line.endswith("ChildFailedError:") for line in lines):
        starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
        lines = lines[: starts[-1]] if starts else lines
    said = [line for line in lines if re.search(r"\w", line) and not LAUNCHER_LOG.match(line)]
    i = len(said) - 1
    while i > 0 and said[i].startswith("│") and said[i - 1].startswith("│"):
        i -= 1
    return said[i].strip("│ ")[:160] if said else ""


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


def resume_flags(flags: dict, resume: str, ckpt: Path) -> dict:
    """Go on to step 3 from ``ckpt``: found by ``--checkpoint.resume auto`` or given by path."""
    return {**flags, "--max-steps": "3", "--checkpoint.resume": "auto" if resume == "auto" else str(ckpt)}


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


def shard(ck: Path, last: bool = False) -> Path:
    """The first (or last) tensor shard of a checkpoint dir."""
    shards = sorted(ck.glob("*.distcp"))
    if not shards:
        raise HarnessError(f"no .distcp shard in {ck}")
    return shards[-1] if last else shards[0]


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
    """A pickle whose unpickling creates ``marker``."""
    return pickle.dumps(_Exec(f"touch {shlex.quote(str(marker))}"), protocol=2)


# --------------------------------------------------------------------------------------------
# cases, the shared matrix state and one case's scratch dir


@dataclasses.dataclass
class Case:
    """One case: ``fn(ctx, **kwargs)``. ``category`` is the module that lists it (set by the registry)."""

    name: str
    fn: Callable[..., tuple[bool, str]]
    kwargs: dict = dataclasses.field(default_factory=dict)
    slow: bool = False  # started first, so that the long ones do not finish last
    needs_flag: str | None = None  # skipped when the trainer's --help no longer lists this flag
    category: str = ""


def case(
    name: str, fn: Callable[..., tuple[bool, str]], slow: bool = False, needs_flag: str | None = None, **kwargs: Any
) -> Case:
    """The case ``name`` that runs ``fn(ctx, **kwargs)``."""
    return Case(name, fn, kwargs, slow, needs_flag)


class Matrix:
    """Shared state: options, scratch root, the trainer's --help, base runs (built once)."""

    TEMPLATES = {
        # name: (model, nproc, extra flags)
        "vit1": ("vit", 1, {"--max-steps": "2", "--checkpoint.every": "1"}),
        "mae2": ("mae", 2, {"--max-steps": "2", "--checkpoint.every": "1"}),
        "other": ("vit", 1, {"--max-steps": "3", "--checkpoint.every": "3", "--run.seed": "1"}),
        "vit3": ("vit", 1, {"--max-steps": "3", "--checkpoint.every": "1", "--checkpoint.keep": "3"}),
    }

    def __init__(self, root: Path, nproc: int):
        global SCRATCH
        SCRATCH = str(root)
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

    def applies(self, case: Case) -> bool:
        """Whether the trainer still has what ``case`` tries (call after ``load_help``)."""
        return case.needs_flag is None or case.needs_flag in self.help_flags

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

    def command(self, argv: list[str], nproc: int, record_exit: bool = False) -> list[str]:
        script = [str(RECORD_EXIT), str(TRAIN)] if record_exit else [str(TRAIN)]
        if nproc > 1:
            launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
            return [sys.executable, *launcher, *script, *argv]
        return [sys.executable, *script, *argv]

    def start(
        self,
        args: dict | list,
        nproc: int = 1,
        fsize: int | None = None,
        env: dict | None = None,
        exit_dir: Path | None = None,
        memory: int | None = None,
    ) -> tuple[subprocess.Popen, Path]:
        """Start the trainer (under torchrun for ``nproc`` > 1); with ``exit_dir`` each rank writes its
        exit status there (``tests/record_exit.py``: torchrun does not report them after a signal)."""
        argv = to_argv(args) if isinstance(args, dict) else list(args)
        cmd = self.command(argv, nproc, record_exit=exit_dir is not None)
        if exit_dir is not None:
            exit_dir.mkdir(parents=True, exist_ok=True)
            env = {**(env or {}), "UCFVIT_EXIT_DIR": str(exit_dir)}
        # fsize: a disk that fills up (writes beyond fsize bytes fail with EFBIG); memory: the address space
        # of each process (an allocation beyond it fails), as a job's memory limit would stop it.
        limits = {"RLIMIT_FSIZE": fsize, "RLIMIT_AS": memory}
        sets = "".join(f"resource.setrlimit(resource.{k}, ({v}, {v})); " for k, v in limits.items() if v is not None)
        if sets:
            limit = f"import os, resource, sys; {sets}os.execv(sys.argv[1], sys.argv[1:])"
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
        proc._acc_start = time.monotonic()  # type: ignore[attr-defined]
        proc._acc_tag = full_env[TAG_VAR]  # type: ignore[attr-defined]
        return proc, log

    def finish(self, proc: subprocess.Popen, log: Path, timeout: float) -> Result:
        start = proc._acc_start  # type: ignore[attr-defined]
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


def run_case(matrix: Matrix, index: int, case: Case) -> tuple[bool, str, float]:
    """Run one case in its own scratch dir: (handled well, reason, seconds)."""
    ctx = Ctx(matrix, matrix.root / "cases" / f"{index:03d}")  # no case name in paths the trainer may print
    start = time.monotonic()
    try:
        ok, reason = case.fn(ctx, **case.kwargs)
    except HarnessError as err:
        ok, reason = False, f"harness: {err}"
    except Exception as err:  # a bug in the harness must not stop the other cases
        ok, reason = False, f"harness error: {type(err).__name__}: {err} [{traceback.format_exc(limit=-2)!r}]"
    return ok, reason, time.monotonic() - start


# --------------------------------------------------------------------------------------------
# judging


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


def refused_naming(
    ctx: Ctx, args: list[str] | dict, tokens: list[str], nproc: int = 1, marker: Path | None = None
) -> tuple[bool, str]:
    """Run ``args``: handled well when refused cleanly, naming every token (a flag, a value or a path),
    and (with ``marker``) without creating the marker."""
    res = ctx.run(args, nproc=nproc, timeout=FLAG_TIMEOUT)
    problems = refusal_problems(res)
    said = message_lines(res.out, scrub=False)
    missing = [t for t in tokens if not (names_flag(said, t) if t.startswith("--") else t in said)]
    if missing:
        problems.append(f"does not name {missing}")
    if marker is not None and marker.exists():
        problems.append("MARKER created: code executed")
    return judge(problems, f"refused: {last_line(res.out)}")
