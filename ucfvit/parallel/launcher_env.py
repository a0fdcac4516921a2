"""The launcher's environment as torch's env:// variables, for processes that ``srun`` started.

torchrun gives every worker ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``. A process that ``srun`` started directly (one task per GPU,
no torchrun: ``launch/frontier/train.sbatch``) has SLURM's variables instead, and
:func:`apply_slurm_env` writes the torchrun names from them into ``os.environ`` before the process
group is made, so torch and the rest of ucfvit see one picture::

    RANK <- SLURM_PROCID        LOCAL_RANK <- SLURM_LOCALID        WORLD_SIZE <- SLURM_NTASKS
    LOCAL_WORLD_SIZE <- this node's entry (SLURM_NODEID) of SLURM_STEP_TASKS_PER_NODE, else
                        SLURM_NTASKS_PER_NODE, else SLURM_TASKS_PER_NODE ("8", "8(x2)", "8,4", "8(x2),4";
                        a plain number holds for every node)

The step's own task list comes first: an ``srun`` inside ``sbatch --ntasks-per-node=...`` may
lay its tasks out differently from the allocation. ``RANK`` in the environment always wins
(torchrun inside SLURM, as ``launch/dgx/train.sbatch`` runs it): then nothing is changed.
``MASTER_ADDR`` and ``MASTER_PORT`` are the launcher script's to export; a SLURM world of one
needs neither and keeps the one-process path of a plain ``python recipes/train.py``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping

__all__ = ["apply_slurm_env", "slurm_env", "slurm_task", "tasks_on_node"]

_TASKS_ENTRY = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")
_TASKS_PER_NODE = ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE")


def tasks_on_node(tasks_per_node: str, node_id: int, variable: str = "SLURM_TASKS_PER_NODE") -> int:
    """Entry ``node_id`` of a SLURM task list: ``"8(x2),4"`` means 8, 8, 4 tasks on nodes 0, 1, 2; a
    plain number (``SLURM_NTASKS_PER_NODE=8``) holds for every node."""
    if tasks_per_node.strip().isdigit():
        return int(tasks_per_node)
    counts: list[int] = []
    for entry in tasks_per_node.split(","):
        match = _TASKS_ENTRY.match(entry.strip())
        if match is None:
            raise ValueError(f"{variable}={tasks_per_node!r} is not a SLURM task list such as '8', '8(x2)' or '8,4'")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise ValueError(f"SLURM_NODEID={node_id} has no entry in {variable}={tasks_per_node!r} ({len(counts)} nodes)")
    return counts[node_id]


def _int(env: Mapping[str, str], name: str, default: str | None = None) -> int:
    value = env.get(name, default)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: SLURM should set it to an integer (is this an srun task?)") from None


def slurm_task(env: Mapping[str, str]) -> bool:
    """Whether this process is an ``srun`` task itself rather than a torchrun worker."""
    return "SLURM_PROCID" in env and "TORCHELASTIC_RUN_ID" not in env


def slurm_env(env: Mapping[str, str]) -> dict[str, str]:
    """The env:// variables that ``env``'s SLURM variables describe; ``{}`` when ``RANK`` is set
    (torchrun), without ``SLURM_PROCID`` (no srun), or for a world of one. Raises ``ValueError``
    naming the variable when they are inconsistent, or when ``MASTER_ADDR``/``MASTER_PORT`` are missing."""
    if "RANK" in env or "SLURM_PROCID" not in env:
        return {}
    world = _int(env, "SLURM_NTASKS", env.get("SLURM_NPROCS"))
    if world <= 1:
        return {}
    rank, local_rank, node = _int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID"), _int(env, "SLURM_NODEID", "0")
    source = next((name for name in _TASKS_PER_NODE if env.get(name)), None)
    if source is None:
        raise ValueError(f"SLURM_NTASKS={world} but none of {', '.join(_TASKS_PER_NODE)} says how many run on a node")
    local_world = tasks_on_node(env[source], node, source)
    if not (0 <= rank < world and 0 <= local_rank < local_world):
        raise ValueError(
            f"SLURM_PROCID={rank}, SLURM_LOCALID={local_rank} do not fit SLURM_NTASKS={world} and "
            f"{source}={env[source]!r} (node {node}): start the trainer with srun, one task per GPU"
        )
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
    if missing:
        raise ValueError(
            f"srun started this process as rank {rank} of {world} (SLURM_PROCID, SLURM_NTASKS) but "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: export MASTER_ADDR (the first "
            "host of the allocation) and MASTER_PORT (a free port) before srun, as launch/frontier/train.sbatch does; "
            "a python started directly in a batch script, without srun, should be started with srun"
        )
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(local_world),
    }


def apply_slurm_env(environ: MutableMapping[str, str] | None = None) -> None:
    """Write :func:`slurm_env` into ``environ`` (default ``os.environ``); idempotent."""
    environ = os.environ if environ is None else environ
    environ.update(slurm_env(environ))
