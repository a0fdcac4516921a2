"""A cost model for planning meshes: step time of one rank from a traced step (``benchmarks/simulate.py``).

Inputs are what the simulator measured on a fake mesh: the step's FLOPs per rank and every
collective (mesh dimension, group size, bytes, whether FSDP or DTensor issued it). The model:

- **compute** = FLOPs per rank / (peak bf16 FLOP/s x ``compute_efficiency``). FLOPs are the model's
  matmuls, 3x forward (6x parameters x tokens for the blocks); full activation checkpointing adds
  one forward; selective checkpointing recomputes element-wise ops only, which are not counted.
- **a collective** over ``n`` ranks takes ``ring_steps x latency + sent_bytes / bandwidth``, with the
  ring algorithm's steps and bytes (:class:`ucfvit.parallel.comm_volume.Collective`). The bandwidth
  and latency are those inside a node if every group of that mesh dimension lies within one node
  (ranks are numbered row-major over ``ddp x fsdp x tp``, ``gpus_per_node`` per node), else those
  between nodes (per device: a node's network bandwidth shared by its devices). A group of two
  neighbouring ranks inside one package (the two GCDs of an MI250X) uses ``pair_gbps``.
- **overlap**: FSDP's collectives (c10d, on their own stream, prefetched one block ahead) overlap the
  compute of forward and backward; DTensor's tensor-parallel collectives and those after backward
  (gradient clipping) are waited for. Step = compute + waited comm + max(0, FSDP comm - compute).
  With the root as the only FSDP unit (``parallelize(wrap="model")``) FSDP's collectives come
  before forward and after backward, so they are waited for too.

It leaves out: kernel launch and Python overhead, memory-bound kernels (norms, GELU, softmax
outside fused attention), congestion between concurrent groups, and the data loader. It ranks
meshes; its absolute times are an estimate. The presets' figures and their sources are below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CLUSTERS", "Cluster", "dims_within_node", "step_time"]


@dataclass(frozen=True)
class Cluster:
    """Per-device figures of a machine (GB = 1e9 bytes)."""

    name: str
    gpus_per_node: int
    peak_tflops: float  # dense bf16 per device
    compute_efficiency: float  # assumed fraction of peak the model's matmuls reach
    memory_gib: float  # device memory
    intra_gbps: float  # ring bandwidth per device inside a node
    inter_gbps: float  # network bandwidth per device between nodes
    intra_latency_us: float  # per ring step
    inter_latency_us: float
    pair_gbps: float | None = None  # two adjacent ranks in one package, if faster than intra_gbps


CLUSTERS = {
    # OLCF Frontier user guide: a node has 4 MI250X = 8 GCDs with 64 GB HBM2e each; a MI250X is
    # 383 TFLOP/s bf16 (191.5 per GCD); the two GCDs of one MI250X are joined by 200 GB/s of Infinity
    # Fabric, GCDs of different MI250X by 50-100 GB/s (a ring over 8 GCDs runs at its slowest link);
    # 4 Slingshot-11 NICs of 25 GB/s per node = 12.5 GB/s per GCD. Latencies and the 40% matmul
    # efficiency are our assumptions (ORBIT reported ~17% of peak end to end, ORBIT-2 ~33%).
    "frontier": Cluster(
        name="frontier",
        gpus_per_node=8,
        peak_tflops=191.5,
        compute_efficiency=0.40,
        memory_gib=64e9 / 2**30,
        intra_gbps=50.0,
        inter_gbps=12.5,
        intra_latency_us=5.0,
        inter_latency_us=10.0,
        pair_gbps=200.0,
    ),
    # NVIDIA DGX H100: 8 H100 SXM (80 GB, 989 TFLOP/s dense bf16), NVLink 4 through NVSwitch at
    # 450 GB/s per direction per GPU (~360 GB/s reached by NCCL rings), 8 ConnectX-7 400 Gb/s NICs
    # = 50 GB/s per GPU. Latencies and the 50% matmul efficiency are our assumptions.
    "dgx-h100": Cluster(
        name="dgx-h100",
        gpus_per_node=8,
        peak_tflops=989.0,
        compute_efficiency=0.50,
        memory_gib=80e9 / 2**30,
        intra_gbps=360.0,
        inter_gbps=50.0,
        intra_latency_us=3.0,
        inter_latency_us=6.0,
    ),
}


def dims_within_node(shape, gpus_per_node: int) -> dict[str, bool]:
    """For each mesh dimension (and ``world``): whether every one of its groups lies in one node."""
    ranks = torch.arange(shape.world_size).view(shape.ddp, shape.fsdp, shape.tp) // gpus_per_node
    out = {name: bool((ranks.amax(k) == ranks.amin(k)).all()) for k, name in enumerate(("ddp", "fsdp", "tp"))}
    out["world"] = shape.world_size <= gpus_per_node
    return out


def _pair_in_package(shape, dims: str) -> bool:
    """Groups of two adjacent ranks (2k, 2k+1): the tp dim of size 2, or fsdp of size 2 with tp = 1."""
    return (dims == "tp" and shape.tp == 2) or (dims == "fsdp" and shape.fsdp == 2 and shape.tp == 1)


def collective_seconds(row: dict, shape, cluster: Cluster) -> float:
    """Time of an aggregate of collectives of one kind (``count``, ``ring_steps`` each, ``sent_bytes`` in all)."""
    inside = dims_within_node(shape, cluster.gpus_per_node).get(row["dims"], False)
    if inside:
        gbps = cluster.pair_gbps if cluster.pair_gbps and _pair_in_package(shape, row["dims"]) else cluster.intra_gbps
        latency = cluster.intra_latency_us
    else:
        gbps, latency = cluster.inter_gbps, cluster.inter_latency_us
    return row["count"] * row["ring_steps"] * latency * 1e-6 + row["sent_bytes"] / (gbps * 1e9)


def step_time(
    comm: list[dict], flops_per_rank: float, shape, cluster: Cluster, global_batch: int, fsdp_overlaps: bool = True
) -> dict:
    """Seconds per step and its parts for one rank (see the module docstring).

    ``comm``: rows of ``phase`` (``forward_backward`` or ``after_backward``), ``dims``, ``op``,
    ``functional``, ``count``, ``ring_steps`` (per call) and ``sent_bytes`` (all calls).
    ``fsdp_overlaps``: FSDP has a unit per block (False: the root is the only unit)."""
    compute = flops_per_rank / (cluster.peak_tflops * 1e12 * cluster.compute_efficiency)
    waited: dict[str, float] = {}
    overlapped: dict[str, float] = {}
    for row in comm:
        t = collective_seconds(row, shape, cluster)
        hidden = fsdp_overlaps and row["phase"] == "forward_backward" and not row["functional"]
        table = overlapped if hidden else waited
        table[row["dims"]] = table.get(row["dims"], 0.0) + t
    exposed_fsdp = max(0.0, sum(overlapped.values()) - compute)
    step = compute + sum(waited.values()) + exposed_fsdp
    return {
        "step_s": step,
        "compute_s": compute,
        "waited_comm_s": waited,
        "overlapped_comm_s": overlapped,
        "unhidden_overlap_s": exposed_fsdp,
        "samples_per_s": global_batch / step,
    }
