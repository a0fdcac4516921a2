"""The benchmarks in a rank of the rank runner: run benchmarks/mfu.py or bf16_curve.py in that process
(the repository is on PYTHONPATH there) and return their JSON lines; mfu.py with timm replaced by a
stand-in when asked."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import types

import torch

from ucfvit.models import build_model

TIMM_CALLS: list[dict] = []


def _stand_in_timm() -> types.ModuleType:
    """A ``timm`` whose ``create_model`` records its call and returns a ucfvit ViT of that shape (timm
    needs torchvision, which has no CPU build to install here)."""
    module = types.ModuleType("timm")
    module.__version__ = "stand-in"

    def create_model(name: str, pretrained: bool = False, **shape):
        TIMM_CALLS.append({"name": name, "pretrained": pretrained, **shape})
        size = "debug" if "embed_dim" in shape else "base"
        dims = {k: shape[k] for k in ("embed_dim", "depth", "num_heads") if k in shape}
        return build_model(
            "vit",
            size,
            img_size=shape["img_size"],
            patch_size=shape["patch_size"],
            in_chans=shape["in_chans"],
            num_classes=shape["num_classes"],
            **dims,
        )

    module.create_model = create_model
    return module


def mfu(argv: list[str], stand_in_timm: bool = False, oom: str | None = None) -> dict:
    """``benchmarks/mfu.py argv``: exit code, JSON records, stderr and the stand-in timm's calls.
    ``oom``: a variant whose step raises torch.OutOfMemoryError, as a full GPU would."""
    from benchmarks import mfu as bench

    if stand_in_timm:
        sys.modules["timm"] = _stand_in_timm()
    if oom is not None:
        build = getattr(bench, oom)

        def out_of_memory(*args, **kwargs):
            variant = build(*args, **kwargs)

            def step(i: int) -> None:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

            variant.step = step
            return variant

        setattr(bench, oom, out_of_memory)
    return {**_run(bench.main, argv), "timm_calls": TIMM_CALLS}


def bf16_curve(argv: list[str]) -> dict:
    """``benchmarks/bf16_curve.py argv``: exit code, JSON records and stderr."""
    from benchmarks import bf16_curve as bench

    return _run(bench.main, argv)


def _run(main, argv: list[str]) -> dict:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    records = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith('{"')]
    return {"code": code, "records": records, "stderr": err.getvalue()[-3000:]}
