"""Throughput, FLOPs and MFU, and the progress line / JSON lines every run prints.

FLOPs per sample (forward) of the transformer parts, for N tokens of width D, MLP width H,
L blocks, patch volume P (pixels per patch times channels):

    per block:      2*4*N*D*D  (q, k, v, proj)  +  2*2*N*D*H  (fc1, fc2)  +  2*2*N*N*D  (scores, weighted sum)
    patch embed:    2*N_all*P*D     (all patches, before MAE masking)
    token heads:    2*N_all*D_in*D_out for decoder_embed / decoder_pred / linear heads

MAE encoders see the kept tokens only; decoders see all patches. Training counts 3x forward
(backward is twice the forward). Convolutional decoders (UNETR) and recomputation under
activation checkpointing are not counted, so MFU is "model FLOPs utilisation" (as in PaLM).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from .atomic import WriteError, nulled_nonfinite

__all__ = ["train_flops_per_sample", "peak_flops", "Throughput", "format_metrics", "format_progress"]

# Dense bf16 tensor-core peak per device (FLOP/s); MI250X per GCD (one GCD is one torch device).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "MI250X": 191.5e12, "MI300X": 1307e12}


def _transformer_flops(tokens: int, width: int, blocks: nn.ModuleList) -> float:
    if len(blocks) == 0:
        return 0.0
    hidden = blocks[0].mlp.fc1.out_features
    return len(blocks) * (8 * tokens * width * width + 4 * tokens * width * hidden + 4 * tokens * tokens * width)


def train_flops_per_sample(model: nn.Module, pooled_head: bool = False) -> float:
    """Training FLOPs for one sample (3x forward) from the model's shape (formula in the module doc).

    ``pooled_head``: the ``head`` maps one pooled token per sample (``FamilySpec.pooled_head``)."""
    n_all, d = model.num_patches, model.embed_dim
    n_enc = getattr(model, "num_keep", n_all) + model.num_prefix_tokens
    patch = model.patch_size**model.ndim * model.in_chans
    flops = 2 * n_all * patch * d + _transformer_flops(n_enc, d, model.blocks)
    decoder_blocks = getattr(model, "decoder_blocks", None)
    if decoder_blocks is not None and len(decoder_blocks):
        dd = model.decoder_embed.out_features
        flops += 2 * n_enc * d * dd + _transformer_flops(n_all + model.num_prefix_tokens, dd, decoder_blocks)
    for name in ("decoder_pred", "head"):
        layer = getattr(model, name, None)
        if isinstance(layer, nn.Linear):
            tokens = 1 if name == "head" and pooled_head else n_all
            flops += 2 * tokens * layer.in_features * layer.out_features
    return 3.0 * flops


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of ``device`` from the table, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


class Throughput:
    """Wall-clock rates over the steps between two log points (no device sync in between)."""

    def __init__(self, step: int):
        self.step, self.time, self.start_time, self.start_step = step, time.perf_counter(), time.perf_counter(), step

    def update(self, step: int) -> tuple[float, float]:
        """(seconds per step since the last call, seconds per step since the start)."""
        now = time.perf_counter()
        interval = (now - self.time) / max(1, step - self.step)
        overall = (now - self.start_time) / max(1, step - self.start_step)
        self.step, self.time = step, now
        return interval, overall


def format_metrics(metrics: dict) -> str:
    """One line of a validation result: its scalar metrics (per-class lists are left to the JSON) and the count."""
    shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
    return f"{shown}  ({metrics['samples']} samples)"


def format_progress(m: dict) -> str:
    eta = int(m["eta_s"])
    mfu = "n/a" if m["mfu"] is None else f"{100 * m['mfu']:.1f}%"
    return (
        f"step {m['step']:>6}/{m['max_steps']} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | gnorm {m['grad_norm']:.3f}"
        f" | {m['images_per_s']:.1f} img/s | {m['tflops']:.2f} TFLOP/s | MFU {mfu}"
        f" | mem {m['peak_mem_gib']:.2f} GiB | ETA {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}"
    )


def append_jsonl(path: Path, record: dict) -> None:
    """Append ``record`` as one line of strict JSON (a non-finite number becomes null, so others can
    read the file); a failed write (a full disk) is a :class:`~ucfvit.train.atomic.WriteError` naming
    the file."""
    record, _ = nulled_nonfinite(record)
    line = json.dumps(record, allow_nan=False) + "\n"
    try:
        with open(path, "a") as f:
            f.write(line)
    except OSError as err:
        raise WriteError(
            f"{path}: appending a metrics line failed ({err.strerror or err}); free space or quota there, then "
            "run the same command again to resume from the last checkpoint"
        ) from None
