"""How many bytes each collective moves, and over which mesh dimension: a measuring CommDebugMode.

:class:`CommVolume` is a ``torch.distributed.tensor.debug.CommDebugMode`` (so ``get_comm_counts()``
is unchanged) that also records, for every collective it sees, the mesh dimension(s) of its
process group, the group size and the payload: the gathered output of an all-gather, the input of
a reduce-scatter, the reduced tensor of an all-reduce, the input of an all-to-all, the broadcast
tensor. It sees FSDP's c10d collectives and DTensor's functional ones alike, with real tensors on
a real process group or with FakeTensors on the ``fake`` backend (``benchmarks/simulate.py``).

Bytes each rank sends follow the ring algorithms (as in nccl-tests' bus bandwidth): an all-gather,
reduce-scatter or all-to-all over ``n`` ranks sends ``(n-1)/n`` of the payload per rank, an
all-reduce ``2(n-1)/n``, a broadcast the payload once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.debug import CommDebugMode

__all__ = ["Collective", "CommVolume"]

_c10d = torch.ops.c10d
_fn = torch.ops._c10d_functional
_fn_autograd = torch.ops._c10d_functional_autograd

# overload packet -> (kind, index of the process group argument, where the payload is)
# payload: "arg0"/"arg1" = that argument (a tensor or a list of them, nested lists summed), "out" = the result
_COLLECTIVES = {
    _c10d.allreduce_: ("all_reduce", 1, "arg0"),
    _c10d.allreduce_coalesced_: ("all_reduce", 1, "arg0"),
    _c10d.broadcast_: ("broadcast", 1, "arg0"),
    _c10d._allgather_base_: ("all_gather", 2, "arg0"),
    _c10d.allgather_: ("all_gather", 2, "arg0"),
    _c10d.allgather_into_tensor_coalesced_: ("all_gather", 2, "arg0"),
    _c10d._reduce_scatter_base_: ("reduce_scatter", 2, "arg1"),
    _c10d.reduce_scatter_: ("reduce_scatter", 2, "arg1"),
    _c10d.reduce_scatter_tensor_coalesced_: ("reduce_scatter", 2, "arg1"),
    _c10d.alltoall_base_: ("all_to_all", 2, "arg1"),
    _c10d.alltoall_: ("all_to_all", 2, "arg1"),
    _fn.all_reduce: ("all_reduce", 2, "arg0"),
    _fn.all_reduce_: ("all_reduce", 2, "arg0"),
    _fn.all_reduce_coalesced: ("all_reduce", 2, "arg0"),
    _fn.all_reduce_coalesced_: ("all_reduce", 2, "arg0"),
    _fn.broadcast: ("broadcast", 2, "arg0"),
    _fn.broadcast_: ("broadcast", 2, "arg0"),
    _fn.all_gather_into_tensor: ("all_gather", 2, "out"),
    _fn.all_gather_into_tensor_coalesced: ("all_gather", 2, "out"),
    _fn.reduce_scatter_tensor: ("reduce_scatter", 3, "arg0"),
    _fn.reduce_scatter_tensor_coalesced: ("reduce_scatter", 3, "arg0"),
    _fn.all_to_all_single: ("all_to_all", 3, "arg0"),
    _fn_autograd.all_gather_into_tensor: ("all_gather", 2, "out"),
    _fn_autograd.reduce_scatter_tensor: ("reduce_scatter", 3, "arg0"),
    _fn_autograd.all_to_all_single: ("all_to_all", 3, "arg0"),
}
_RING_FACTOR = {"all_reduce": 2.0, "all_gather": 1.0, "reduce_scatter": 1.0, "all_to_all": 1.0}


@dataclass(frozen=True)
class Collective:
    """One collective call as :class:`CommVolume` saw it.

    Attributes:
        op: ``all_gather``, ``reduce_scatter``, ``all_reduce``, ``all_to_all`` or ``broadcast``.
        dims: the mesh dimension the process group spans (e.g. ``"fsdp"``), ``"world"`` for the
            default group, ``"other"`` for a group of no mesh dimension.
        group_size: ranks in the group.
        payload_bytes: bytes of the full buffer (see the module docstring).
        functional: issued as a functional collective (DTensor: the next op waits for it) rather
            than a c10d one (FSDP, on its own stream: overlaps compute).
    """

    op: str
    dims: str
    group_size: int
    payload_bytes: int
    functional: bool

    @property
    def sent_bytes(self) -> float:
        """Bytes each rank sends with a ring algorithm."""
        n = self.group_size
        if n <= 1:
            return 0.0
        if self.op == "broadcast":
            return float(self.payload_bytes)
        return _RING_FACTOR[self.op] * (n - 1) / n * self.payload_bytes

    @property
    def ring_steps(self) -> int:
        """Sequential ring steps, each paying one latency: ``n-1`` (``2(n-1)`` for an all-reduce)."""
        n = self.group_size
        return 0 if n <= 1 else (2 if self.op == "all_reduce" else 1) * (n - 1)


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class CommVolume(CommDebugMode):
    """``CommDebugMode`` that also records each collective's bytes and mesh dimension.

    ``mesh``: the ``("ddp", "fsdp", "tp")`` mesh (or any named mesh) whose dimension groups name the
    collectives. Use as a context manager around a step; then :attr:`collectives` lists every call
    (``benchmarks/simulate.py`` sums them per dimension and operation). Entering again starts afresh.
    """

    def __init__(self, mesh: DeviceMesh):
        super().__init__()
        self.collectives: list[Collective] = []
        # Groups are named by their members: a second mesh of the same shape in this process (or a
        # submesh cached from one) has other group objects over the same ranks.
        self._dims: dict[frozenset[int], str] = {}
        for name in mesh.mesh_dim_names or ():
            self._dims.setdefault(frozenset(dist.get_process_group_ranks(mesh.get_group(name))), name)
        self._dims.setdefault(frozenset(range(dist.get_world_size())), "world")
        self._groups: dict[str, tuple[str, int]] = {}  # group name -> (dims, size)

    def __enter__(self):
        self.collectives = []
        return super().__enter__()

    def _group(self, group) -> tuple[str, int]:
        """``(dims, size)`` of a collective's group argument (a group name or a boxed ProcessGroup)."""
        pg = (
            dist.distributed_c10d._resolve_process_group(group)
            if isinstance(group, str)
            else dist.ProcessGroup.unbox(group)
        )
        if pg.group_name not in self._groups:
            ranks = frozenset(dist.get_process_group_ranks(pg))
            self._groups[pg.group_name] = (self._dims.get(ranks, "other"), len(ranks))
        return self._groups[pg.group_name]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if out is NotImplemented or isinstance(func, torch._ops.HigherOrderOperator):
            return out
        entry = _COLLECTIVES.get(func._overloadpacket)
        if entry is not None:
            kind, group_arg, payload = entry
            dims, size = self._group(args[group_arg])
            data = out if payload == "out" else args[int(payload[-1])]
            self.collectives.append(
                Collective(
                    op=kind,
                    dims=dims,
                    group_size=size,
                    payload_bytes=_nbytes(data),
                    functional=func.namespace != "c10d",
                )
            )
        return out
