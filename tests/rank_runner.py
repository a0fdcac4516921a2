"""Run a function on N CPU ranks (gloo), each in its own fresh process with its own process group.

``run_ranks(n, function, *args)`` runs ``function(*args)`` in ``n`` forked processes with the
torchrun environment variables set, and returns the JSON-able results of every rank. ``function``
is a module-level function (of a helper module in tests/ or of the test file itself, e.g.
``distributed.test_compile``), or its name as ``"module:function"``. A failing or hanging rank
fails the call with the ranks' output; every process is killed at the timeout.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable

TESTS = pathlib.Path(__file__).parent

# One launcher process imports torch, ucfvit and the target module once, then forks a child per
# rank (a fresh process group in each): on a 2-core machine, importing torch in 8 separate
# processes would take longer than the test itself.
_LAUNCHER = r"""
import importlib, json, os, sys, traceback
spec, args_path, tmp, world = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
module, function = spec.split(":")
target = getattr(importlib.import_module(module), function)
call = json.load(open(args_path))
children = {}
for rank in range(world):
    pid = os.fork()
    if pid == 0:
        code = 0
        log = os.open(os.path.join(tmp, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT)
        os.dup2(log, 1); os.dup2(log, 2)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
        try:
            result = target(*call["args"], **call["kwargs"])
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
            json.dump(result, open(os.path.join(tmp, f"rank{rank}.json"), "w"))
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    children[pid] = rank
failed = []
while children:
    pid, status = os.wait()
    if status != 0:
        failed.append(children[pid])
    children.pop(pid)
sys.exit(1 if failed else 0)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(target: str | Callable) -> tuple[str, list[str]]:
    """``"module:function"`` of ``target``, and the folder its module must be imported from (the one
    holding its top-level package: tests/ for ``unit.test_x``)."""
    if isinstance(target, str):
        return target, []
    name, qualname = target.__module__, target.__qualname__
    if "." in qualname or name == "__main__":
        raise ValueError(f"run_ranks needs a module-level function of an importable module, not {name}.{qualname}")
    path = pathlib.Path(sys.modules[name].__file__).resolve()
    return f"{name}:{qualname}", [str(path.parents[name.count(".")])]


def run_ranks(
    world_size: int,
    target: str | Callable,
    *args,
    kwargs: dict | None = None,
    timeout: float = 300,
    env: dict | None = None,
) -> list:
    """Run ``target(*args, **kwargs)`` on ``world_size`` ranks; return each rank's result."""
    target, folders = _spec(target)
    with tempfile.TemporaryDirectory() as tmp:
        args_path = os.path.join(tmp, "args.json")
        with open(args_path, "w") as f:
            json.dump({"args": list(args), "kwargs": kwargs or {}}, f)
        launch_env = {
            **os.environ,
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": os.pathsep.join([*folders, str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
            **(env or {}),
        }
        proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, target, args_path, tmp, str(world_size)],
            env=launch_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
            failed = f"exit code {proc.returncode}" if proc.returncode else None
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank
            out, _ = proc.communicate()
            failed = f"timeout after {timeout}s"
        if failed is not None:
            text = [out.decode(errors="replace")[-2000:]]
            for rank in range(world_size):
                path = os.path.join(tmp, f"rank{rank}.log")
                log = pathlib.Path(path).read_text()[-4000:] if os.path.exists(path) else "(no output)"
                text.append(f"----- rank {rank} -----\n{log}")
            raise RuntimeError(f"{target} on {world_size} ranks failed ({failed}):\n" + "\n".join(text))
        return [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(world_size)]
