"""Everything a training run needs, as typed dataclasses (parsed from the command line by tyro).

Top-level fields pick the recipe (``model``, ``model_size``), the mesh and the length; groups hold
the rest. Every field has a default, documented by its docstring (shown by ``--help``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass
class ArchConfig:
    """Model hyper-parameters (``None``: the value of the ``--model-size`` preset)."""

    img_size: tuple[int, ...] = (32, 32)
    """Image size: two entries for 2D, three for 3D volumes."""
    in_chans: int = 3
    """Input channels."""
    num_classes: int = 2
    """Classes (vit: per image; unetr, sap: per pixel)."""
    patch_size: int | None = None
    """Patch side in pixels."""
    embed_dim: int | None = None
    """Encoder width."""
    depth: int | None = None
    """Encoder blocks."""
    num_heads: int | None = None
    """Encoder attention heads (must be divisible by the mesh's tp)."""
    decoder_embed_dim: int | None = None
    """Decoder width (mae, sap, diffusion)."""
    decoder_depth: int | None = None
    """Decoder blocks (mae, sap, diffusion)."""
    decoder_num_heads: int | None = None
    """Decoder attention heads (must be divisible by tp)."""
    mask_ratio: float = 0.75
    """MAE: fraction of patches hidden from the encoder."""
    drop_path_rate: float = 0.0
    """Stochastic depth, increasing linearly over blocks."""
    pos_embed: Literal["sincos", "learned", "none"] = "sincos"
    """Position embedding of the patch tokens."""
    rope: bool = False
    """Rotary position embedding over the 2D/3D patch coordinates."""
    attn_backend: Literal["sdpa", "xformers", "math"] = "sdpa"
    """Attention kernel."""
    time_steps: int = 1000
    """Diffusion: number of DDPM steps."""


@dataclass
class DataConfig:
    """Input data. ``synthetic`` needs no files: images/volumes are generated from (seed, sample index)."""

    dataset: Literal["synthetic"] = "synthetic"
    """Data source."""
    global_batch_size: int = 16
    """Samples per optimizer step over all data-parallel ranks and micro-batches."""
    micro_batch_size: int | None = None
    """Samples per rank per forward; fewer than the rank's share means gradient accumulation (None: no accumulation)."""


@dataclass
class OptimConfig:
    """AdamW."""

    lr: float = 1e-3
    """Peak learning rate (before ``lr_scaling``)."""
    lr_scaling: Literal["none", "linear"] = "none"
    """``linear``: lr = lr * global_batch_size / 256."""
    weight_decay: float = 0.05
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""


@dataclass
class ScheduleConfig:
    """Linear warm-up from ``warmup_start_lr`` then cosine decay to ``min_lr`` at ``max_steps``."""

    warmup_steps: int = 10
    """Steps of linear warm-up."""
    warmup_start_lr: float = 0.0
    """Learning rate at step 0."""
    min_lr: float = 0.0
    """Learning rate at the last step."""


@dataclass
class ParallelConfig:
    """How the model is parallelized over the mesh (see ``ucfvit.parallelize``)."""

    param_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype of parameters over fp32 master weights (``auto``: bf16 on GPUs, fp32 on CPU)."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute activations per block in backward."""
    compile: bool = False
    """torch.compile each block."""
    sequence_parallel: bool = False
    """Run norms on sequence shards (tp > 1)."""
    reshard_after_forward: bool = True
    """Free gathered parameters of inner blocks after forward."""


@dataclass
class CheckpointConfig:
    """Distributed checkpoints in ``<run.dir>/checkpoints``."""

    every: int = 0
    """Save every N steps (0: only at the end)."""
    keep: int = 2
    """Complete checkpoints to keep (oldest removed first)."""
    resume: str = "none"
    """``none``, ``auto`` (newest complete checkpoint of the run directory, else start fresh) or a checkpoint PATH."""
    export_safetensors: bool = False
    """At the end, write a consolidated ``model.safetensors`` (+ ``model_config.json``) to the run directory."""


@dataclass
class MetricsConfig:
    """Progress output."""

    log_every: int = 10
    """Print a progress line (and a JSON line to metrics.jsonl) every N steps."""


@dataclass
class RunConfig:
    """Where and how reproducibly the run happens."""

    dir: Path = Path("runs/default")
    """Run directory: config.json, metrics.jsonl, checkpoints/ and exports."""
    seed: int = 0
    """Seed of initialisation, data and forward randomness."""


@dataclass
class Config:
    """A ucfvit training run."""

    model: Literal["vit", "mae", "unetr", "sap", "diffusion"] = "mae"
    """Model family (picks the recipe)."""
    model_size: Literal["debug", "tiny", "small", "base", "large", "huge", "giant"] = "debug"
    """Size preset (see ucfvit.models.SIZES)."""
    mesh: str = "1x1x1"
    """ddp x fsdp x tp; the product must equal the number of processes."""
    max_steps: int = 60
    """Optimizer steps."""
    arch: ArchConfig = field(default_factory=ArchConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

