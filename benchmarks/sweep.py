"""Scaling sweep generator: one SLURM script per run, ``submit_all.sh`` and ``manifest.json``.

    python benchmarks/sweep.py --system frontier --account ABC123 --nodes 1 2 4 8 \\
        --models vit:large mae:huge --scaling both --per-gpu-batch 32 --out sweeps/frontier-vit
    bash sweeps/frontier-vit/submit_all.sh           # sbatch every script (arguments go to sbatch)
    python benchmarks/collect.py sweeps/frontier-vit # results.csv, results.md, plots
    python benchmarks/sweep.py --system dgx --account A --partition batch --nodes 1 2 4 --models vit:huge \\
        --meshes auto "ddp=*,fsdp=4,tp=2" --extra="--parallel.activation-checkpointing selective" \\
        --launcher-args="--image /lustre/me/ucfvit.sqsh --mounts /lustre/data:/lustre/data"

A run is one (model:size, scaling kind, node count, mesh). Weak scaling keeps the work per GPU:
global batch = ``--per-gpu-batch`` x GPUs; strong scaling keeps the problem: every node count trains
``--global-batch`` (default: the weak batch of the smallest node count). Every GPU count is
``nodes x 8`` (Frontier: 8 MI250X GCDs per node; DGX H100: 8 GPUs).

``--meshes`` takes one or more rules; each gives one ``ddp x fsdp x tp`` mesh per node count:

    auto                 ddp=*,fsdp=8,tp=1: FSDP inside a node (Infinity Fabric / NVLink), replicas
                         across nodes (HSDP), so only gradients cross the slower network, once per step
    ddp=A,fsdp=B,tp=C    a template; one value may be ``*`` (the GPUs left), e.g. ``ddp=1,fsdp=*,tp=1``
                         (FSDP over every GPU) or ``ddp=*,fsdp=4,tp=2`` (tensor parallel inside a node)
    DxFxT                a literal mesh, for the node count with D*F*T GPUs

tp must divide the 8 GPUs of a node (its all-reduces run every layer) and the model's head counts.
``auto`` uses no tp: a ViT up to ``giant`` fits FSDP-sharded; tp trades per-GPU speed for memory, so
ask for it explicitly. Two rules giving the same mesh make one run.

Layout of ``--out``: ``scripts/NAME.sbatch`` (each a complete sbatch script that runs the system's
launcher, ``launch/<system>/train.sbatch`` of this checkout, with ``--launcher-args``, then ``--`` and the
run's training options, in the sweep directory; arguments to the script go to the launcher, so ``bash
scripts/NAME.sbatch --dry-run`` prints what the job would start), ``logs/NAME-JOBID.out``, ``runs/NAME``
(the run directories), ``manifest.json`` and ``submit_all.sh`` (job ids go to ``jobs.txt``). The runs'
options are checked here, with ``recipes/train.py``'s own parser and model checks on the GPU recipe, so
a typo in ``--extra`` or a head count that tp does not divide fails now, not after the queue.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ucfvit.models import build_model, get_family, list_sizes
from ucfvit.parallel import MeshShape, check_parallelizable, parse_mesh
from ucfvit.train.cli import as_argv, check_argv
from ucfvit.train.config import ConfigError
from ucfvit.train.plan import model_kwargs
from ucfvit.train.throughput import PEAK_BF16

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class System:
    """A cluster: where its launcher is, GPUs per node, the dense bf16 peak of one GPU, extra #SBATCH lines."""

    launcher: str
    gpus_per_node: int
    peak_tflops: float
    directives: tuple[str, ...] = ()


# Peaks (dense bf16, per torch device): MI250X 383 TFLOP/s per module of 2 GCDs (AMD Instinct MI250X
# specifications, amd.com), one GCD being one GPU on Frontier (OLCF Frontier User Guide: 4 MI250X = 8
# GCDs per node); H100 SXM 1,979 TFLOP/s with 2:4 sparsity, half without (NVIDIA H100 datasheet).
SYSTEMS = {
    "frontier": System("launch/frontier/train.sbatch", 8, PEAK_BF16["MI250X"] / 1e12),
    "dgx": System("launch/dgx/train.sbatch", 8, PEAK_BF16["H100"] / 1e12, ("--gpus-per-node=8", "--exclusive")),
}
# Options every run gets from the sweep itself; --extra may not set them.
SWEEP_OPTIONS = (
    "--model",
    "--model-size",
    "--mesh",
    "--data.global-batch-size",
    "--max-steps",
    "--run.dir",
    "--config",
)


class SweepError(ValueError):
    """A bad option of this script; the message names it."""


@dataclass
class Run:
    """One job of the sweep, as listed in manifest.json (paths relative to the sweep directory)."""

    name: str
    system: str
    nodes: int
    gpus: int
    mesh: str
    mesh_rule: str
    model: str
    size: str
    scaling: str
    global_batch: int
    run_dir: str
    script: str
    train_args: list[str]


def mesh_for(rule: str, nodes: int, per_node: int) -> MeshShape | None:
    """The mesh ``rule`` gives on ``nodes`` nodes (None: a literal mesh of another GPU count)."""
    gpus = nodes * per_node
    template = f"ddp=*,fsdp={per_node},tp=1" if rule == "auto" else rule
    if "=" not in template:
        try:
            shape = parse_mesh(template)
        except ValueError as err:
            raise SweepError(f"--meshes {rule}: {err}") from None
        if shape.world_size != gpus:
            return None
        _check_tp(rule, shape.tp, per_node)
        return shape
    items = dict(item.partition("=")[::2] for item in template.split(","))
    if sorted(items) != ["ddp", "fsdp", "tp"] or template.count(",") != 2:
        raise SweepError(f"--meshes {rule}: a template names ddp, fsdp and tp once each, e.g. ddp=*,fsdp=8,tp=1")
    stars = [dim for dim, value in items.items() if value == "*"]
    fixed = {dim: value for dim, value in items.items() if value != "*"}
    if len(stars) > 1 or not all(v.isdigit() and int(v) > 0 for v in fixed.values()):
        raise SweepError(f"--meshes {rule}: each size is a positive integer, or '*' for at most one dimension")
    if "tp" in fixed:
        _check_tp(rule, int(fixed["tp"]), per_node)
    product = int(fixed.get("ddp", 1)) * int(fixed.get("fsdp", 1)) * int(fixed.get("tp", 1))
    if stars:
        if gpus % product:
            raise SweepError(f"--meshes {rule}: --nodes {nodes} has {gpus} GPUs, not a multiple of {product}")
        fixed[stars[0]] = str(gpus // product)
    shape = MeshShape(int(fixed["ddp"]), int(fixed["fsdp"]), int(fixed["tp"]))
    if shape.world_size != gpus:
        raise SweepError(
            f"--meshes {rule}: mesh {shape} has {shape.world_size} ranks but --nodes {nodes} has {gpus} GPUs "
            f"(ddp*fsdp*tp must equal nodes*{per_node})"
        )
    _check_tp(rule, shape.tp, per_node)
    return shape


def _check_tp(rule: str, tp: int, per_node: int) -> None:
    if per_node % tp:
        raise SweepError(
            f"--meshes {rule}: tp={tp} must divide the {per_node} GPUs of a node (tensor parallelism stays "
            f"inside a node): use tp in {[d for d in range(1, per_node + 1) if per_node % d == 0]}"
        )


def meshes(rules: list[str], nodes: list[int], per_node: int) -> dict[int, list[tuple[str, MeshShape]]]:
    """``nodes -> [(rule, mesh)]``, each mesh once; every node count needs one, every literal mesh a node count."""
    out: dict[int, list[tuple[str, MeshShape]]] = {n: [] for n in nodes}
    for rule in rules:
        found = False
        for n in nodes:
            shape = mesh_for(rule, n, per_node)
            if shape is None:
                continue
            found = True
            if all(shape != s for _, s in out[n]):
                out[n].append((rule, shape))
        if not found:
            counts = ", ".join(str(n * per_node) for n in nodes)
            raise SweepError(f"--meshes {rule}: ddp*fsdp*tp matches no node count (--nodes x {per_node}: {counts})")
    for n, found_meshes in out.items():
        if not found_meshes:
            raise SweepError(f"--meshes: no mesh for --nodes {n} ({n * per_node} GPUs); add auto or a template")
    return out


def parse_models(specs: list[str]) -> list[tuple[str, str]]:
    """``["vit:large", ...]`` -> ``[("vit", "large"), ...]``, checked against the registry."""
    out = []
    for spec in specs:
        model, _, size = spec.partition(":")
        if not size:
            raise SweepError(f"--models {spec}: write MODEL:SIZE, e.g. vit:large")
        try:
            get_family(model)
        except ValueError as err:
            raise SweepError(f"--models {spec}: {err}") from None
        if size not in list_sizes(model):
            raise SweepError(f"--models {spec}: size {size!r} is unknown; choose one of {list_sizes(model)}")
        if (model, size) not in out:
            out.append((model, size))
    return out


def words(flag: str, text: str) -> list[str]:
    """``text`` split as a shell would (quotes kept together)."""
    try:
        return shlex.split(text)
    except ValueError as err:
        raise SweepError(f"{flag} {text!r}: {err}") from None


def check_extra(extra: list[str]) -> None:
    """Refuse ``--extra`` options that the sweep sets per run."""
    given = {a.split("=", 1)[0].replace("_", "-") for a in extra if a.startswith("--")}
    clash = [o for o in SWEEP_OPTIONS if o in given]
    if clash:
        raise SweepError(f"--extra sets {', '.join(clash)}, which the sweep sets for each run (see --help)")


def train_config(model: str, size: str, steps: int, extra: list[str]):
    """The training config that ``recipes/train.py`` makes of one model's options and ``--extra`` on a GPU
    node (:func:`ucfvit.train.cli.check_argv`, the GPU recipe: 224 px, bf16, on any machine); its error
    becomes one line naming ``--extra``."""
    argv = ["--model", model, "--model-size", size, "--max-steps", str(steps), *extra]
    try:
        return check_argv(argv, accelerator=True)
    except ConfigError as err:
        raise SweepError(f"--extra: {err}") from None


def plan(args: argparse.Namespace) -> list[Run]:
    """Every run of the sweep, after checking all options (nothing is written)."""
    system = SYSTEMS[args.system]
    per_node = system.gpus_per_node
    if not re.fullmatch(r"(\d+-)?\d+:\d\d:\d\d", args.time):
        raise SweepError(f"--time {args.time}: write HH:MM:SS (or D-HH:MM:SS)")
    if any(n <= 0 for n in args.nodes):
        raise SweepError(f"--nodes {' '.join(map(str, args.nodes))}: node counts are positive")
    for flag, value in (
        ("--per-gpu-batch", args.per_gpu_batch),
        ("--global-batch", args.global_batch),
        ("--steps", args.steps),
    ):
        if value is not None and value <= 0:
            raise SweepError(f"{flag} {value}: must be positive")
    if args.global_batch is not None and args.scaling == "weak":
        raise SweepError("--global-batch is the batch of strong scaling: use --scaling strong or both")
    out = Path(args.out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SweepError(f"--out {args.out}: exists and is not an empty directory; choose a new one")
    if re.search(r"\s", str(out)):
        raise SweepError(f"--out {out}: #SBATCH lines cannot hold a path with spaces")
    extra = args.extra
    check_extra(extra)
    nodes = sorted(set(args.nodes))
    models = parse_models(args.models)
    by_nodes = meshes(args.meshes, nodes, per_node)
    kinds = ["weak", "strong"] if args.scaling == "both" else [args.scaling]
    strong_batch = args.global_batch or args.per_gpu_batch * nodes[0] * per_node
    runs = []
    for model, size in models:
        cfg = train_config(model, size, args.steps, extra)
        try:
            with torch.device("meta"):
                net = build_model(model, size, **model_kwargs(cfg))
        except ValueError as err:
            raise SweepError(f"--extra for --models {model}:{size}: {err}") from None
        for tp in sorted({shape.tp for found in by_nodes.values() for _, shape in found}):
            try:
                check_parallelizable(net, tp, **cfg.parallel.checked_options())
            except ValueError as err:
                raise SweepError(f"--meshes with tp={tp} for --models {model}:{size}: {err}") from None
        for kind in kinds:
            for n in nodes:
                for rule, shape in by_nodes[n]:
                    gpus = n * per_node
                    batch = args.per_gpu_batch * gpus if kind == "weak" else strong_batch
                    flag = "--per-gpu-batch" if kind == "weak" else "--global-batch"
                    if batch % shape.dp_size:
                        raise SweepError(
                            f"{flag}: {kind} scaling on mesh {shape} has global batch {batch}, not divisible by "
                            f"the data-parallel size ddp*fsdp={shape.dp_size}"
                        )
                    micro = cfg.data.micro_batch_size
                    if micro is not None and (batch // shape.dp_size) % micro:
                        raise SweepError(
                            f"--extra: --data.micro-batch-size={micro} does not divide the per-rank batch "
                            f"{batch // shape.dp_size} of {kind} scaling on mesh {shape}"
                        )
                    name = f"{model}-{size}-{kind}-n{n}-{shape}"
                    options = {
                        "--model": model,
                        "--model-size": size,
                        "--mesh": shape,
                        "--data.global-batch-size": batch,
                        "--max-steps": args.steps,
                        "--run.dir": out / "runs" / name,
                    }
                    train_args = [*as_argv(options), *extra]
                    run = Run(
                        name=name,
                        system=args.system,
                        nodes=n,
                        gpus=gpus,
                        mesh=str(shape),
                        mesh_rule=rule,
                        model=model,
                        size=size,
                        scaling=kind,
                        global_batch=batch,
                        run_dir=f"runs/{name}",
                        script=f"scripts/{name}.sbatch",
                        train_args=train_args,
                    )
                    runs.append(run)
    return runs


def script_text(run: Run, args: argparse.Namespace, out: Path) -> str:
    """A complete sbatch script for ``run``: its #SBATCH lines, then the launcher with the run's options."""
    system = SYSTEMS[run.system]
    directives = [
        "-J " + run.name,
        "-A " + args.account,
        f"-N {run.nodes}",
        "-t " + args.time,
        f"-o {out / 'logs' / run.name}-%j.out",
        *system.directives,
    ]
    if args.partition:
        directives.append("-p " + args.partition)
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives)]
    lines += [
        f"# ucfvit scaling sweep: {run.model}:{run.size}, {run.scaling} scaling, {run.nodes} nodes x "
        f"{system.gpus_per_node} GPUs, mesh {run.mesh}, global batch {run.global_batch}.",
        "# Arguments given to this script go to the launcher (e.g. --dry-run); after -- come the training options.",
        "# The sweep directory is the working directory: the DGX launcher mounts it into the container.",
        f"cd {shlex.quote(str(out))}",
        f'exec bash {shlex.quote(str(ROOT / system.launcher))} "$@" {shlex.join([*args.launcher_args, "--"])} '
        + shlex.join(run.train_args),
    ]
    return "\n".join(lines) + "\n"


def submit_text(runs: list[Run]) -> str:
    names = " ".join(shlex.quote(r.name) for r in runs)
    return (
        "#!/bin/bash\n"
        f"# Submit the {len(runs)} runs of this sweep; arguments go to sbatch (e.g. -q debug). Job ids: jobs.txt.\n"
        "set -euo pipefail\n"
        'cd "$(dirname "$0")"\n'
        f"for name in {names}; do\n"
        '    id=$(sbatch --parsable "$@" "scripts/$name.sbatch")\n'
        '    echo "$name $id" | tee -a jobs.txt\n'
        "done\n"
    )


def write(runs: list[Run], args: argparse.Namespace) -> Path:
    """Write the scripts, ``submit_all.sh`` and ``manifest.json`` into ``--out``; returns it."""
    out = Path(args.out).resolve()
    for sub in ("scripts", "logs", "runs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for run in runs:
        (out / run.script).write_text(script_text(run, args, out))
        (out / run.script).chmod(0o755)
    (out / "submit_all.sh").write_text(submit_text(runs))
    (out / "submit_all.sh").chmod(0o755)
    system = SYSTEMS[args.system]
    manifest = {
        "system": args.system,
        "gpus_per_node": system.gpus_per_node,
        "peak_tflops_per_gpu": system.peak_tflops,
        "steps": args.steps,
        "launcher_args": args.launcher_args,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *args.argv],
        "runs": [asdict(r) for r in runs],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def summary(runs: list[Run], out: Path) -> str:
    rows = [("run", "nodes", "GPUs", "mesh", "global batch")]
    rows += [(r.name, str(r.nodes), str(r.gpus), r.mesh, str(r.global_batch)) for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)
    return f"{table}\n{len(runs)} runs in {out}; submit them with: bash {out / 'submit_all.sh'}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", required=True, choices=sorted(SYSTEMS), help="cluster (launcher, peak TFLOP/s)")
    parser.add_argument("--nodes", required=True, type=int, nargs="+", help="node counts, e.g. 1 2 4 8")
    parser.add_argument("--models", required=True, nargs="+", metavar="MODEL:SIZE", help="e.g. vit:large mae:huge")
    parser.add_argument("--scaling", choices=["weak", "strong", "both"], default="weak")
    parser.add_argument("--per-gpu-batch", type=int, default=32, help="weak scaling: global batch = this x GPUs")
    parser.add_argument("--global-batch", type=int, help="strong scaling (default: the smallest weak batch)")
    parser.add_argument("--meshes", nargs="+", default=["auto"], metavar="RULE", help="mesh rules (see above)")
    parser.add_argument("--steps", type=int, default=100, help="--max-steps of every run")
    parser.add_argument("--account", required=True, help="SLURM account (#SBATCH -A)")
    parser.add_argument("--partition", help="SLURM partition (#SBATCH -p); default: the cluster's")
    parser.add_argument("--time", default="00:30:00", help="wall-time limit per run, HH:MM:SS")
    parser.add_argument("--out", required=True, help="sweep directory (new or empty)")
    parser.add_argument("--extra", default="", help='train options for every run: --extra="--parallel.compile"')
    parser.add_argument("--launcher-args", default="", help="launcher options, e.g. --launcher-args='--image X.sqsh'")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        args.extra, args.launcher_args = words("--extra", args.extra), words("--launcher-args", args.launcher_args)
        runs = plan(args)
    except SweepError as err:
        sys.exit(f"sweep.py: error: {err}")
    print(summary(runs, write(runs, args)))
    container = any(a.split("=")[0] in ("--image", "--no-container") for a in args.launcher_args)
    if args.system == "dgx" and not container and not os.environ.get("UCFVIT_IMAGE"):
        print(
            "note: the DGX launcher needs a container: export UCFVIT_IMAGE before submitting, or regenerate with "
            "--launcher-args='--image IMAGE' (or '--no-container')"
        )


if __name__ == "__main__":
    main()
