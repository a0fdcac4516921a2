"""The trainer: presets, schedule, accumulation, errors, export, crash-safe checkpoints and
resharding (CPU, gloo, forked ranks; see tests/train_cases.py for the worker side)."""

from __future__ import annotations

import json
import math
import re

import pytest

from distributed import run_ranks
from ucfvit.train.checkpoint import find_checkpoint, is_complete
from ucfvit.train.optim import layer_scales, lr_at, param_groups, set_lr
from ucfvit.train.presets import preset


def test_lr_schedule_values():
    cfg = preset("mae", accelerator=False)
    cfg.max_steps, cfg.optim.lr = 110, 1e-3
    cfg.schedule.warmup_steps, cfg.schedule.warmup_start_lr, cfg.schedule.min_lr = 10, 1e-5, 1e-6
    assert lr_at(0, cfg) == pytest.approx(1e-5)
    assert lr_at(5, cfg) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))  # half-way through the cosine
    assert lr_at(110, cfg) == pytest.approx(1e-6)
    cfg.optim.lr_scaling, cfg.data.global_batch_size = "linear", 512
    assert lr_at(10, cfg) == pytest.approx(2e-3)


def test_weight_decay_skips_biases_norms_and_what_the_model_names():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model.register_parameter("token", torch.nn.Parameter(torch.zeros(1, 1, 4)))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(p.shape for p in decay["params"]) == [(1, 1, 4), (4, 4)]
    assert len(no_decay["params"]) == 3  # linear bias, norm weight and bias
    model.no_weight_decay = lambda: {"token"}
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [(4, 4)] and len(no_decay["params"]) == 4


def test_layer_decay_scales_each_block_and_set_lr_applies_it():
    import torch

    from ucfvit.models import build_model

    model = build_model("vit", "debug", img_size=16)  # depth 2
    scales = layer_scales(model, 0.5)
    assert scales["cls_token"] == scales["patch_embed.proj.weight"] == scales["pos_embed"] == 0.125
    assert scales["blocks.0.attn.q.weight"] == 0.25 and scales["blocks.1.mlp.fc2.bias"] == 0.5
    assert scales["norm.weight"] == scales["head.weight"] == 1.0
    optimizer = torch.optim.AdamW(param_groups(model, 0.05, 0.5))
    set_lr(optimizer, 1e-3)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(lr_of) == len(named)
    for name, param in named.items():
        assert lr_of[id(param)] == 1e-3 * scales[name], name
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decays[id(named["blocks.0.attn.q.weight"])] == 0.05 and decays[id(named["blocks.0.attn.q.bias"])] == 0
    named["blocks.0.attn.q.weight"].requires_grad_(False)
    assert sum(len(g["params"]) for g in param_groups(model, 0.05, 0.5)) == len(named) - 1  # frozen: left out


def test_every_preset_runs_three_steps_in_2d_and_3d(tmp_path):
    results = run_ranks(1, "train_cases:all_presets", 3, str(tmp_path), timeout=400)[0]
    assert {(r["model"], r["ndim"]) for r in results} == {
        (m, d) for m in ("vit", "mae", "unetr", "sap", "diffusion") for d in (2, 3)
    }
    for r in results:
        assert r["steps"] == 3 and math.isfinite(r["loss"]), r


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    common = ["--mesh", "1x2x1", "--max-steps", "2", "--data.global-batch-size", "8"]
    big = run_ranks(2, "train_cases:run", "mae", [*common, "--run.dir", str(tmp_path / "a")])[0]
    acc = run_ranks(
        2, "train_cases:run", "mae", [*common, "--data.micro-batch-size", "2", "--run.dir", str(tmp_path / "b")]
    )[0]
    assert abs(big["loss"] - acc["loss"]) < 1e-6
    for k, v in big["params"].items():
        assert abs(v - acc["params"][k]) <= 1e-5 * max(1.0, abs(v)), k


def test_exported_safetensors_reproduce_the_parallel_model(tmp_path):
    r = run_ranks(
        4, "train_cases:export_matches", "mae", ["--mesh", "1x2x2", "--max-steps", "2", "--run.dir", str(tmp_path)]
    )[0]
    assert r["plain_is_plain"] and r["diff"] < 1e-5, r
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "model_config.json").is_file()


@pytest.mark.parametrize(
    "world, argv, match",
    [
        (2, ["--mesh", "2x2x2"], r"mesh 2x2x2 has 8 ranks but the world size is 2"),
        (
            2,
            ["--mesh", "1x2x1", "--checkpoint.resume", "/nonexistent/ckpt"],
            r"--checkpoint.resume=/nonexistent/ckpt: no complete checkpoint",
        ),
        (
            2,
            ["--mesh", "1x2x1", "--run.dir", "/dev/null/run"],
            r"--run.dir=/dev/null/run cannot be created \(/dev/null is not a directory\)",
        ),
        (
            2,
            ["--mesh", "1x1x2", "--arch.num-heads", "3", "--arch.embed-dim", "48"],
            r"num_heads=3 .* not divisible by tp=2",
        ),
        (
            2,
            ["--mesh", "1x2x1", "--data.global-batch-size", "5"],
            r"global-batch-size=5 must be divisible by the data-parallel size",
        ),
        (
            2,
            ["--mesh", "1x1x2", "--parallel.compile", "--parallel.activation-checkpointing", "full"],
            r"on mesh 1x1x2: activation_checkpointing='full' with compile=True and tp > 1",
        ),
    ],
)
def test_bad_options_fail_on_every_rank_before_any_collective(world, argv, match, tmp_path):
    if "--run.dir" not in argv:
        argv = [*argv, "--run.dir", str(tmp_path)]
    messages = run_ranks(world, "train_cases:error", "mae", argv, timeout=120)
    for msg in messages:
        assert re.search(match, msg), msg


def test_fewer_model_classes_than_data_classes_is_refused(tmp_path):
    from ucfvit.train.cli import parse
    from ucfvit.train.plan import validate_config

    cfg = parse(["--model", "vit", "--arch.num-classes", "2", "--run.dir", str(tmp_path)])
    with pytest.raises(ValueError, match=r"--arch.num-classes=2 is smaller than the 3 classes of the data"):
        validate_config(cfg)
    assert validate_config(parse(["--model", "vit", "--run.dir", str(tmp_path)])).model.num_classes == 3


def test_resume_compares_the_resolved_model_options(tmp_path):
    """The preset's depth spelled out resumes; a real difference is refused naming both values."""
    from ucfvit.train.cli import parse
    from ucfvit.train.plan import validate_config

    common = ["--run.dir", str(tmp_path), "--checkpoint.resume", "auto"]
    run_ranks(1, "train_cases:run", "mae", ["--max-steps", "1", *common])
    resumed = run_ranks(1, "train_cases:run", "mae", ["--max-steps", "2", "--arch.depth", "2", *common])[0]
    assert resumed["steps"] == 2
    for option, message in [
        ("--arch.qkv-bias", r"\(--arch.qkv-bias: checkpoint True, this run False\)"),
        ("--arch.rope", r"\(--arch.rope: checkpoint False, this run True\)"),
    ]:
        cfg = parse(["--model", "mae", option, str("rope" in option), *common])
        with pytest.raises(ValueError, match=message + r"; to resume it, pass the checkpoint's values of " + option):
            validate_config(cfg)
    # Through train() on two ranks: every rank refuses alike, before any collective.
    argv = ["--mesh", "1x2x1", "--arch.depth", "3", *common]
    for msg in run_ranks(2, "train_cases:error", "mae", argv, timeout=120):
        assert re.search(r"holds a different model \(--arch.depth: checkpoint 2, this run 3\)", msg), msg


@pytest.mark.parametrize("when", ["start", "after_shards"])
def test_sigkill_during_checkpoint_write_keeps_the_previous_one(tmp_path, when):
    argv = ["--max-steps", "4", "--checkpoint.every", "2", "--run.dir", str(tmp_path)]
    with pytest.raises(RuntimeError, match="exit code"):
        run_ranks(1, "train_cases:crash_during_save", "mae", argv, when)
    assert (tmp_path / "checkpoints" / "step-00000004.tmp").is_dir()  # the interrupted write
    ckpt = find_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "step-00000002" and is_complete(ckpt)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000002"
    resumed = run_ranks(1, "train_cases:run", "mae", [*argv, "--checkpoint.resume", "auto"])[0]
    assert resumed["steps"] == 4 and find_checkpoint(tmp_path).name == "step-00000004"


def test_checkpoint_keys_do_not_depend_on_activation_checkpointing_or_compile(tmp_path):
    plain = run_ranks(
        2,
        "train_cases:checkpoint_keys",
        "vit",
        ["--mesh", "1x1x2", "--max-steps", "1", "--run.dir", str(tmp_path / "a")],
    )[0]
    ac = run_ranks(
        2,
        "train_cases:checkpoint_keys",
        "vit",
        [
            "--mesh",
            "1x1x2",
            "--max-steps",
            "1",
            "--run.dir",
            str(tmp_path / "b"),
            "--parallel.activation-checkpointing",
            "full",
        ],
    )[0]
    assert plain == ac and "blocks.0.attn.q.weight" in plain
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["model"] == "vit"


def test_compile_keeps_module_names():
    from ucfvit.models import build_model
    from ucfvit.parallel import apply_compile

    model = build_model("vit", "debug")
    names = sorted(model.state_dict())
    apply_compile(model.blocks)  # what parallelize(compile=True, wrap="blocks") does; compilation is lazy
    apply_compile([model])  # and wrap="model"
    assert sorted(model.state_dict()) == names
    modules = sorted(n for n, _ in build_model("vit", "debug").named_modules())
    assert sorted(n for n, _ in model.named_modules()) == modules
