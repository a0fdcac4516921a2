"""Training speed on one device: img/s, achieved TFLOP/s and MFU of ucfvit's production path, its
ceiling and (``--compare timm``) timm, measured in the same run.

Three variants of each case, each timed over ``--steps`` training steps (forward, backward,
optimizer) after ``--warmup`` steps (which absorb compilation):

- ``ucfvit``: the production path, what ``recipes/train.py`` runs on a 1x1x1 mesh: the GPU recipe
  (bf16 compute over fp32 master weights through FSDP2's MixedPrecisionPolicy, ``torch.compile``
  as ``--parallel.wrap`` picks, fused AdamW on a GPU), ``parallelize``, the trainer's
  ``accumulate_gradients``, gradient clipping and the optimizer step;
- ``ceiling``: the same model with every parameter in bf16 (no fp32 master weights: not an
  equivalent recipe, only a speed bound), compiled whole, no FSDP, AdamW on the bf16 parameters;
- ``timm`` (ViT cases, ``--compare timm``): timm's model of the same size as its users train it:
  fp32 weights, bf16 autocast, ``torch.compile``, fused AdamW, cross-entropy.

FLOPs per step are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the meta device
(forward and backward of each variant's own model; recomputation under activation checkpointing
is not counted), MFU is against the device's dense bf16 peak (``ucfvit.train.throughput.PEAK_BF16``).
Data is random and already on the device. Each ``ucfvit`` line carries ``vs_ceiling`` and
``vs_timm_autocast_compiled`` (img/s ratios); a batch that runs out of memory gives a line with
``"oom": true``. ``--profile`` adds the ten kernels that take the most time (a table on stderr, a
list in the JSON line) and the attention operators that ran (which SDPA backend: flash, cuDNN, ...).
Options after the known ones go to the training recipe, e.g. ``--parallel.activation-checkpointing
full`` or ``--parallel.wrap blocks``.

Without a GPU (or with ``--tiny``) the cases are debug-size models on 32x32 images (16^3 volumes),
so the harness itself can be tested anywhere.

    python benchmarks/mfu.py --cases vit-l16 mae-l16 --compare timm --profile

Prints one JSON line per case and variant on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.utils.flop_counter import FlopCounterMode

from ucfvit.models import SampleRNG, build_model, get_family
from ucfvit.parallel import apply_compile, clip_grad_norm_, make_mesh, parallelize, parse_mesh
from ucfvit.train.cli import as_argv, parse
from ucfvit.train.config import Config, ConfigError
from ucfvit.train.optim import build_optimizer
from ucfvit.train.plan import build_checked_model, model_kwargs
from ucfvit.train.ranges import check_ranges
from ucfvit.train.throughput import peak_flops
from ucfvit.train.trainer import accumulate_gradients

SEED = 0


@dataclass(frozen=True)
class Case:
    """One benchmark: a family and size at an image size (a GPU run) and the timm model to compare."""

    model: str
    size: str
    img_size: tuple[int, ...]
    patch: int
    batch: int  # default batch on a GPU
    in_chans: int = 3
    timm: str | None = None
    arch: dict = field(default_factory=dict)

    def tiny(self) -> Case:
        """The same family at debug size on 32x32 images (16^3 volumes), for CPUs and tests."""
        img = (32, 32) if len(self.img_size) == 2 else (16, 16, 16)
        return Case(self.model, "debug", img, 4, 4, self.in_chans, self.timm, self.arch)


CASES = {
    "vit-b16": Case("vit", "base", (224, 224), 16, 256, timm="vit_base_patch16_224"),
    "vit-l16": Case("vit", "large", (224, 224), 16, 128, timm="vit_large_patch16_224"),
    "vit-h14": Case("vit", "huge", (224, 224), 14, 64, timm="vit_huge_patch14_224"),
    "mae-l16": Case("mae", "large", (224, 224), 16, 512, arch={"mask_ratio": 0.75}),
    "vit-b16-3d": Case("vit", "base", (128, 128, 128), 16, 32, in_chans=1),
    "unetr-b16-3d": Case("unetr", "base", (128, 128, 128), 16, 4, in_chans=1),
}


class BenchError(ValueError):
    """A bad option of this script: printed as one line."""


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), help=f"any of {', '.join(CASES)}")
    ap.add_argument("--batch", nargs="+", type=int, help="batch sizes per case (default: the case's own)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    ap.add_argument("--compare", choices=["timm"], help="also run timm's same-size model (ViT cases)")
    ap.add_argument("--profile", action="store_true", help="the top-10 kernels of each variant")
    ap.add_argument("--tiny", action="store_true", help="debug-size models (the default without a GPU)")
    ap.add_argument("--backend", default=None, help="torch.compile backend (default: inductor)")
    args, rest = ap.parse_known_args(argv)
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        raise BenchError(f"--cases {' '.join(unknown)}: unknown; choose from {', '.join(CASES)}")
    if args.batch is not None and any(b < 1 for b in args.batch):
        raise BenchError(f"--batch {' '.join(map(str, args.batch))}: batch sizes must be positive")
    if args.steps < 1 or args.warmup < 1:
        raise BenchError(f"--steps {args.steps} --warmup {args.warmup}: both must be at least 1")
    bad = [a.split("=")[0] for a in rest if a.startswith("--") and a.split("=")[0] in _OWN_RECIPE_FLAGS]
    if bad:
        raise BenchError(f"{bad[0]} is set by the case; pick cases with --cases and batches with --batch")
    return args, rest


# Recipe options each case sets itself.
_OWN_RECIPE_FLAGS = {
    "--model",
    "--model-size",
    "--mesh",
    "--arch.img-size",
    "--arch.patch-size",
    "--arch.in-chans",
    "--data.global-batch-size",
    "--data.micro-batch-size",
}


def recipe(case: Case, batch: int, rest: list[str]) -> Config:
    """The training recipe of ``case``: the GPU preset (also on a CPU, so the harness runs the GPU
    settings there), the case's shape, then ``rest``."""
    argv = as_argv(
        {
            "--model": case.model,
            "--model-size": case.size,
            "--mesh": "1x1x1",
            "--arch.img-size": case.img_size,
            "--arch.patch-size": case.patch,
            "--arch.in-chans": case.in_chans,
            "--data.global-batch-size": batch,
        }
    )
    for name, value in case.arch.items():
        argv += [f"--arch.{name.replace('_', '-')}", str(value)]
    return parse([*argv, *rest], accelerator=True)


def random_batch(model: torch.nn.Module, batch: int, device, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random images and labels shaped as the model's input; what every family's loss reads."""
    classes = max(2, getattr(model, "num_classes", 2) or 2)
    img = tuple(model.img_size)
    return {
        "image": torch.randn(batch, model.in_chans, *img, device=device, dtype=dtype),
        "label": torch.randint(0, classes, (batch,), device=device),
        "seg": torch.randint(0, classes, (batch, *img), device=device),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(run: Callable[[], torch.Tensor]) -> float:
    """FLOPs of forward + backward of ``run()`` (a loss), counted by FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        run().backward()
    return float(counter.get_total_flops())


@dataclass
class Variant:
    """A model ready to train: ``step(i)`` runs training step ``i``; ``flops`` per step; ``settings``."""

    step: Callable[[int], None]
    flops: float
    settings: dict


def production(cfg: Config, flops: float, device: torch.device, backend: str | None) -> Variant:
    """ucfvit as recipes/train.py runs ``cfg`` on a 1x1x1 mesh."""
    batch = cfg.data.global_batch_size
    shape = parse_mesh(cfg.mesh, 1)
    spec, model = build_checked_model(cfg, shape)
    mesh = make_mesh(shape, device_type=device.type)
    options = cfg.parallel.parallelize_options(device.type)
    if options["compile"] and backend:
        options["compile"] = backend
    parallelize(model, mesh, **options)
    model.to_empty(device=device)
    torch.manual_seed(SEED)
    model.init_weights()
    model.train()
    optimizer = build_optimizer(model, cfg, device.type)
    extra = spec.build_extra(model)
    batches = itertools.repeat(random_batch(model, batch, device))

    def step(i: int) -> None:
        accumulate_gradients(model, spec, batches, mesh, cfg, i, 1, batch, extra, device)
        clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    dtype = options["param_dtype"]
    settings = {
        "param_dtype": "bfloat16" if dtype is not None else "float32",
        "master_weights": "float32",
        "compile": options["compile"],
        "wrap": cfg.parallel.wrap,
        "ac": cfg.parallel.activation_checkpointing,
        "fused_adamw": bool(optimizer.defaults.get("fused")),
        "grad_clip": cfg.optim.grad_clip,
    }
    return Variant(step, flops, settings)


def recipe_flops(cfg: Config) -> float:
    """FLOPs of one step of ``cfg``'s family loss, on a meta-device copy of its model."""
    spec, batch = get_family(cfg.model), cfg.data.global_batch_size
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.model_size, **model_kwargs(cfg))
    data = random_batch(model, batch, "meta")
    return count_flops(lambda: spec.loss(model, data, SampleRNG(SEED, 0, 0, batch), spec.build_extra(model)))


def ceiling(cfg: Config, flops: float, device: torch.device, backend: str | None) -> Variant:
    """``cfg``'s model with every parameter in bf16, compiled whole, no FSDP."""
    spec, batch = get_family(cfg.model), cfg.data.global_batch_size
    with torch.device(device):
        model = build_model(cfg.model, cfg.model_size, **model_kwargs(cfg))
    torch.manual_seed(SEED)
    model.init_weights()
    model.to(torch.bfloat16).train()
    apply_compile([model], backend=backend)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        weight_decay=cfg.optim.weight_decay,
        fused=fused,
        foreach=None if fused else True,
    )
    extra = spec.build_extra(model)
    data = random_batch(model, batch, device, torch.bfloat16)

    def step(i: int) -> None:
        spec.loss(model, data, SampleRNG(cfg.run.seed, i, 0, batch, device=device), extra).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    settings = {"param_dtype": "bfloat16", "master_weights": None, "compile": backend or True, "fused_adamw": fused}
    return Variant(step, flops, settings)


def timm_variant(case: Case, batch: int, device: torch.device, backend: str | None) -> Variant:
    """timm's model of the case's size: fp32 weights, bf16 autocast, compiled, fused AdamW."""
    try:
        import timm
    except ImportError:
        raise BenchError("--compare timm needs timm: pip install timm") from None
    shape = {"img_size": case.img_size[0], "patch_size": case.patch, "in_chans": case.in_chans, "num_classes": 1000}
    if case.size == "debug":  # the debug size of ucfvit (timm names the full-size architecture)
        shape |= {"embed_dim": 64, "depth": 2, "num_heads": 8}
    with torch.device("meta"):
        meta = timm.create_model(case.timm, pretrained=False, **shape)
    x_meta, y_meta = (
        torch.randn(batch, case.in_chans, *case.img_size, device="meta"),
        torch.zeros(batch, dtype=torch.long, device="meta"),
    )
    flops = count_flops(lambda: F.cross_entropy(meta(x_meta), y_meta))
    model = timm.create_model(case.timm, pretrained=False, **shape).to(device).train()
    compiled = torch.compile(model, **({"backend": backend} if backend else {}))
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, foreach=None if fused else True)
    x = torch.randn(batch, case.in_chans, *case.img_size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step(i: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    settings = {
        "param_dtype": "float32",
        "autocast": "bfloat16",
        "compile": backend or True,
        "fused_adamw": fused,
        "timm": f"{case.timm} (timm {timm.__version__})",
    }
    return Variant(step, flops, settings)


def profile(step: Callable[[int], None], device: torch.device, start: int, steps: int = 3) -> dict:
    """``top_kernels``: the ten kernels (device) or operators (CPU) with the most self time per step (the
    table goes to stderr); ``attention_ops``: the attention operators that ran, which name the SDPA
    backend dispatched (flash, cuDNN, memory-efficient, math)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(start, start + steps):
            step(i)
        _sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key) > 0]
    total = sum(getattr(e, key) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    print(prof.key_averages().table(sort_by=key, row_limit=10), file=sys.stderr, flush=True)
    top = [
        {"name": e.key, "ms_per_step": getattr(e, key) / 1e3 / steps, "share": getattr(e, key) / total}
        for e in events[:10]
    ]
    attention = sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key or "attention" in e.key})
    return {"top_kernels": top, "attention_ops": attention}


def measure(variant: Variant, args: argparse.Namespace, device: torch.device, peak: float | None) -> dict:
    """Warm up, then time ``args.steps`` steps (one device sync at each end)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup):
        variant.step(i)
    _sync(device)
    graphs = counters["stats"]["unique_graphs"]
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        variant.step(i)
    _sync(device)
    step_s = (time.perf_counter() - start) / args.steps
    out = {
        "step_ms": 1e3 * step_s,
        "tflops": variant.flops / step_s / 1e12,
        "mfu": None if peak is None else variant.flops / step_s / peak,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "recompiled_while_timed": counters["stats"]["unique_graphs"] > graphs,
        "flops_per_step": variant.flops,
        "settings": variant.settings,
    }
    if args.profile:
        out |= profile(variant.step, device, args.warmup + args.steps)
    return out


def run_case(name: str, case: Case, cfg: Config, args, device: torch.device) -> list[dict]:
    """Every variant of one case at the batch size of its recipe ``cfg``: the JSON records, the ucfvit
    one last with its ratios."""
    peak, batch = peak_flops(device), cfg.data.global_batch_size
    flops = recipe_flops(cfg)  # the same model in the ceiling and the production path
    base = {
        "case": name,
        "model": case.model,
        "size": case.size,
        "img_size": list(case.img_size),
        "patch": case.patch,
        "batch": batch,
        "steps": args.steps,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    builders = {"ceiling": lambda: ceiling(cfg, flops, device, args.backend)}
    if args.compare == "timm" and case.timm:
        builders["timm"] = lambda: timm_variant(case, batch, device, args.backend)
    builders["ucfvit"] = lambda: production(cfg, flops, device, args.backend)
    records = {}
    for label, build in builders.items():
        torch._dynamo.reset()
        counters.clear()
        try:
            record = {**base, "variant": label, **measure(build(), args, device, peak)}
            record["img_per_s"] = batch / (record["step_ms"] / 1e3)
        except torch.OutOfMemoryError:
            record = {**base, "variant": label, "oom": True}
        record["graph_breaks"] = sum(counters["graph_break"].values())
        records[label] = record
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ours = records["ucfvit"]

    def ratio(other: str) -> float | None:
        theirs = records.get(other, {})
        return ours["img_per_s"] / theirs["img_per_s"] if "img_per_s" in ours and "img_per_s" in theirs else None

    ours["vs_ceiling"] = ratio("ceiling")
    ours["vs_timm_autocast_compiled"] = ratio("timm")
    return list(records.values())


def main(argv: list[str] | None = None) -> int:
    try:
        args, rest = parse_args(sys.argv[1:] if argv is None else argv)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        tiny = args.tiny or device.type != "cuda"
        runs = []
        for name in args.cases:  # every option checked before anything runs
            case = CASES[name].tiny() if tiny else CASES[name]
            for batch in args.batch or [case.batch]:
                cfg = recipe(case, batch, rest)  # a bad flag: tyro prints it and exits 2
                check_ranges(cfg)
                try:
                    build_checked_model(cfg, parse_mesh(cfg.mesh, 1))
                except ValueError as err:
                    raise BenchError(f"--cases {name} --batch {batch}: {err}") from None
                runs.append((name, case, cfg))
        for name, case, cfg in runs:
            for record in run_case(name, case, cfg, args, device):
                print(json.dumps(record), flush=True)
    except (BenchError, ConfigError) as err:
        print(f"mfu.py: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exit:  # argparse or tyro, having printed the error
        return exit.code
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
