"""The config is checked before anything is created: numeric ranges (ucfvit.train.ranges), model
shapes, checkpoint compatibility on resolved model options, and the checks of load_exported."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ucfvit.models import FAMILIES, build_model
from ucfvit.models.registry import resolved_model_kwargs
from ucfvit.models.rng import keyed_rand
from ucfvit.train.cli import parse
from ucfvit.train.config import ARCH_OPTIONS, ConfigError
from ucfvit.train.export import CONFIG_FILE, METADATA_KEY, MODEL_FILE, load_exported, save_exported
from ucfvit.train.plan import validate_config
from ucfvit.train.presets import preset, set_dotted
from ucfvit.train.ranges import RANGES, Range, check_ranges, flag, numeric_fields


def family_for(path: str) -> str:
    """A family that takes option ``path`` (every family takes the non-arch ones)."""
    return ARCH_OPTIONS[path[5:]].families[0] if path.startswith("arch.") else "mae"


# --- ranges ------------------------------------------------------------------------------------


def test_every_numeric_option_has_a_range():
    fields = {path: (kind, is_tuple) for path, kind, is_tuple in numeric_fields()}
    # The walk sees the nested groups, Optional fields and tuples (it is not vacuous).
    assert fields["optim.betas"] == (float, True) and fields["arch.img_size"] == (int, True)
    assert fields["data.micro_batch_size"] == (int, False) and fields["arch.init_values"] == (float, False)
    missing = sorted(set(fields) - set(RANGES))
    assert not missing, (
        f"give these numeric options a Range (--arch.*: in the OPTION_RANGES above the model constructor that "
        f"takes them; others: ucfvit/train/ranges.py TRAINING_RANGES): {missing}"
    )
    stale = sorted(set(RANGES) - set(fields))
    assert not stale, f"RANGES names no numeric option: {stale}"


def bad_values(allowed: Range, kind: type) -> list:
    """Values just outside ``allowed`` (and NaN/inf for floats)."""
    step = 1 if kind is int else 0.5
    out = []
    if allowed.low is not None:
        out.append(allowed.low if allowed.low_open else allowed.low - step)
    if allowed.high is not None:
        out.append(allowed.high if allowed.high_open else allowed.high + step)
    return out + ([math.nan, math.inf, -math.inf] if kind is float else [])


CASES = [
    (path, value)
    for path, kind, _ in numeric_fields()
    for value in bad_values(RANGES[path], kind)
    if not (path == "schedule.min_lr" and value == math.inf)  # (inf is refused either way)
]


@pytest.mark.parametrize("path, value", CASES, ids=[f"{p}={v}" for p, v in CASES])
def test_each_out_of_range_value_is_one_config_error_naming_flag_value_and_range(path, value, tmp_path):
    cfg = preset(family_for(path), accelerator=False)
    kind_is_tuple = dict((p, t) for p, _, t in numeric_fields())[path]
    current = getattr(cfg.arch, path[5:]) if path.startswith("arch.") else None
    if kind_is_tuple:
        value = (*(current or (32,))[:1], value) if path == "arch.img_size" else (0.9, value)
    set_dotted(cfg, path, value)
    cfg.run.dir = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    msg = str(err.value)
    assert msg.startswith(f"{flag(path)}={value} is out of range: "), msg
    assert str(RANGES[path]) in msg and "\n" not in msg, msg
    assert not cfg.run.dir.exists()


# Ranges as intended, through the command line (the table above only checks itself).
REFUSED = [
    (["--max-steps", "0"], r"^--max-steps=0 is out of range: it must be an integer in \[1, 2\*\*32\]$"),
    (["--optim.lr", "0"], r"^--optim.lr=0.0 is out of range: it must be a finite number > 0$"),
    (["--optim.lr", "nan"], r"^--optim.lr=nan is out of range"),
    (["--optim.eps", "0"], r"^--optim.eps=0.0 is out of range: it must be a finite number > 0$"),
    (["--optim.betas", "0.9", "1"], r"^--optim.betas=\(0.9, 1.0\) is out of range: each entry must be .* in \[0, 1\)$"),
    (["--optim.weight-decay", "-0.1"], r"^--optim.weight-decay=-0.1 is out of range: .* >= 0$"),
    (["--optim.grad-clip", "inf"], r"^--optim.grad-clip=inf is out of range"),
    (["--schedule.warmup-steps", "-1"], r"^--schedule.warmup-steps=-1 is out of range: it must be an integer >= 0$"),
    (["--checkpoint.keep", "0"], r"^--checkpoint.keep=0 is out of range: it must be an integer >= 1$"),
    (["--checkpoint.every", "-1"], r"^--checkpoint.every=-1 is out of range"),
    (["--metrics.log-every", "0"], r"^--metrics.log-every=0 is out of range"),
    (["--data.global-batch-size", "0"], r"^--data.global-batch-size=0 is out of range"),
    (["--data.micro-batch-size", "0"], r"^--data.micro-batch-size=0 is out of range"),
    (["--data.num-classes", "1"], r"^--data.num-classes=1 is out of range: it must be an integer >= 2$"),
    (["--run.seed", "-1"], r"^--run.seed=-1 is out of range: it must be an integer in \[0, 2\*\*64 - 1\]$"),
    (["--run.seed", str(2**64)], r"^--run.seed=18446744073709551616 is out of range"),
    (["--arch.patch-size", "0"], r"^--arch.patch-size=0 is out of range: it must be an integer >= 1$"),
    (["--arch.img-size", "32", "0"], r"^--arch.img-size=\(32, 0\) is out of range: each entry must be an integer >= 1"),
    (["--arch.mask-ratio", "1"], r"^--arch.mask-ratio=1.0 is out of range: it must be a finite number in \[0, 1\)$"),
    (["--arch.decoder-depth", "-1"], r"^--arch.decoder-depth=-1 is out of range: it must be an integer >= 0$"),
    (["--arch.mlp-ratio", "0"], r"^--arch.mlp-ratio=0.0 is out of range: it must be a finite number > 0$"),
    (["--arch.init-values", "-1e-5"], r"^--arch.init-values=-1e-05 is out of range"),
    (["--arch.drop-path-rate", "1"], r"^--arch.drop-path-rate=1.0 is out of range"),
    (["--model", "vit", "--arch.num-classes", "0"], r"^--arch.num-classes=0 is out of range"),
    (["--schedule.min-lr", "0.01", "--optim.lr", "0.002"], r"^--schedule.min-lr=0.01 is above the peak learning rate "),
    (
        ["--schedule.min-lr", "0.01", "--optim.lr", "0.1", "--optim.lr-scaling", "linear"],
        r"^--schedule.min-lr=0.01 is above the peak learning rate 0.00625 \(--optim.lr=0.1 \(x global batch / 256",
    ),
    # Shapes the model cannot run with although each option is in range: one line, before any build.
    (["--arch.rope", "True", "--arch.embed-dim", "24"], r"head width embed_dim / num_heads = 24 / 8 = 3 must be even"),
    # The model's own messages name the flags that set the options (and the family/size).
    (
        ["--arch.mlp-ratio", "0.01"],
        r"^mae/debug: --arch.mlp-ratio=0.01 leaves the MLP no hidden feature at --arch.embed-dim=64",
    ),
    (["--arch.decoder-mlp-ratio", "0.01"], r"--arch.decoder-mlp-ratio=0.01 leaves the MLP no hidden feature"),
    (
        ["--arch.img-size", "16", "16", "--arch.patch-size", "5"],
        r"^mae/debug: --arch.img-size=\(16, 16\) must be divisible by --arch.patch-size=5 along every axis",
    ),
    (
        ["--arch.decoder-num-heads", "3"],
        r"^mae/debug: --arch.decoder-embed-dim=32 must be divisible by --arch.decoder-num-heads=3$",
    ),
    (["--data.micro-batch-size", "3"], r"must divide the per-rank batch 16 .*: choose one of \[1, 2, 4, 8, 16\]$"),
]


@pytest.mark.parametrize("argv, match", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_refused_on_the_command_line(argv, match, tmp_path):
    model = [] if "--model" in argv else ["--model", "mae"]
    cfg = parse([*model, *argv, "--run.dir", str(tmp_path / "run")])
    with pytest.raises(ConfigError, match=match):
        validate_config(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--optim.lr", "1e-9", "--optim.betas", "0", "0.999", "--optim.grad-clip", "0", "--optim.weight-decay", "0"],
        ["--schedule.warmup-steps", "0", "--schedule.min-lr", "0.002", "--checkpoint.every", "0"],
        ["--run.seed", "0"],
        ["--run.seed", str(2**64 - 1)],
        ["--arch.decoder-depth", "0", "--arch.init-values", "0", "--arch.mask-ratio", "0"],
        ["--max-steps", str(2**32), "--data.num-classes", "2"],
    ],
)
def test_boundary_values_are_accepted(argv, tmp_path):
    validate_config(parse(["--model", "mae", *argv, "--run.dir", str(tmp_path)]))


def test_the_seed_range_is_what_torch_and_philox_take():
    torch.manual_seed(2**64 - 1)  # the largest accepted seed works everywhere it goes
    keyed_rand(2**64 - 1, 0, 0, (1, 4))
    with pytest.raises((RuntimeError, ValueError), match="Overflow"):
        torch.manual_seed(2**64)
    # The Philox key is the seed modulo 2**64: a larger seed would silently repeat a smaller one.
    assert torch.equal(keyed_rand(2**64 + 5, 0, 0, (1, 4)), keyed_rand(5, 0, 0, (1, 4)))
    check_ranges(parse(["--model", "vit", "--run.seed", str(2**64 - 1)]))


# --- resolved model options --------------------------------------------------------------------

OVERRIDES = [{}, {"depth": 3}, {"adaptive_patching": True, "pos_embed": "sincos"}, {"class_token": True}]


def simple_attributes(model: torch.nn.Module) -> dict:
    return {k: v for k, v in vars(model).items() if isinstance(v, (bool, int, float, str, tuple, type(None)))}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_resolved_kwargs_build_the_same_model_as_the_preset(family):
    """The constructor signatures state the real defaults (no hidden ``setdefault``), so the
    resolution that checkpoints and exports compare builds exactly the model build_model builds."""
    spec = FAMILIES[family]
    accepted = resolved_model_kwargs(family, "debug").keys()
    for overrides in OVERRIDES:
        overrides = {k: v for k, v in overrides.items() if k in accepted}
        preset_only = {k: v for k, v in spec.sizes["debug"].items() if k in accepted} | overrides
        with torch.device("meta"):
            try:
                plain = spec.model(**preset_only)
            except ValueError:
                continue  # (e.g. a family that refuses the combination; then so does the other build)
            resolved = spec.model(**resolved_model_kwargs(family, "debug", overrides))
        assert repr(plain) == repr(resolved), (family, overrides)
        assert simple_attributes(plain) == simple_attributes(resolved), (family, overrides)
        shapes = {k: v.shape for k, v in plain.state_dict().items()}
        assert shapes == {k: v.shape for k, v in resolved.state_dict().items()}, (family, overrides)


def fake_checkpoint(run_dir: Path, argv: list[str]) -> None:
    """A complete-looking checkpoint whose config.json is that of ``argv`` (the compatibility check
    reads only config.json; a real resume is tested in test_train.py)."""
    step = run_dir / "checkpoints" / "step-00000001"
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(b"")
    (step / "trainer_state.json").write_text('{"step": 1}')
    (step / "optimizer.json").write_text('{"param_groups": []}')
    (step / "config.json").write_text(json.dumps(parse(argv).to_dict()))
    files = {
        p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in step.iterdir()
    }
    (step / "manifest.json").write_text(json.dumps({"format": "ucfvit-checkpoint/1", "files": files}))


@pytest.mark.parametrize(
    "saved, resumed",
    [
        ([], ["--arch.depth", "2"]),  # the preset's value, spelled out
        (["--arch.depth", "2", "--arch.qkv-bias", "True"], []),  # and the other way round (True: the default)
        ([], ["--arch.drop-path-rate", "0.1", "--arch.mask-ratio", "0.5"]),  # runtime options may change
    ],
)
def test_resume_accepts_the_same_model_spelled_differently(saved, resumed, tmp_path):
    fake_checkpoint(tmp_path, ["--model", "mae", *saved, "--run.dir", str(tmp_path)])
    cfg = parse(["--model", "mae", *resumed, "--checkpoint.resume", "auto", "--run.dir", str(tmp_path)])
    assert validate_config(cfg).checkpoint is not None


@pytest.mark.parametrize(
    "resumed, match",
    [
        (["--arch.rope", "True"], r"\(--arch.rope: checkpoint False, this run True\)"),
        (["--arch.num-heads", "4"], r"\(--arch.num-heads: checkpoint 8, this run 4\)"),
        (["--arch.pos-embed", "learned_sincos"], r"--arch.pos-embed: checkpoint 'sincos', this run 'learned_sincos'"),
        (
            ["--arch.qk-norm", "True", "--arch.init-values", "1e-5"],
            r"\(--arch.init-values: checkpoint None, this run 1e-05; --arch.qk-norm: checkpoint False, this run True\);"
            r" to resume it, pass the checkpoint's values of --arch.init-values, --arch.qk-norm; to train this model,"
            r" use a new --run.dir",
        ),
        (["--model-size", "tiny"], r"--arch.depth: checkpoint 2, this run 12"),
    ],
)
def test_resume_refuses_a_different_model_naming_both_values(resumed, match, tmp_path):
    fake_checkpoint(tmp_path, ["--model", "mae", "--run.dir", str(tmp_path)])
    cfg = parse(["--model", "mae", *resumed, "--checkpoint.resume", "auto", "--run.dir", str(tmp_path)])
    with pytest.raises(ConfigError, match=match):
        validate_config(cfg)


def test_a_checkpoint_named_by_path_of_another_model_offers_dropping_the_path(tmp_path):
    fake_checkpoint(tmp_path / "vit-run", ["--model", "vit", "--run.dir", str(tmp_path / "vit-run")])
    ckpt = tmp_path / "vit-run" / "checkpoints" / "step-00000001"
    cfg = parse(["--model", "mae", "--checkpoint.resume", str(ckpt), "--run.dir", str(tmp_path / "new")])
    with pytest.raises(ConfigError, match=r"resume it with --model vit, or drop --checkpoint.resume \(start fresh\)$"):
        validate_config(cfg)
    assert not (tmp_path / "new").exists()


# --- load_exported -----------------------------------------------------------------------------


def export(run_dir: Path, argv: list[str]) -> torch.nn.Module:
    """Export a freshly built model of ``argv`` as the trainer would (without the collective)."""
    spec = validate_config(parse(["--model", "mae", "--run.dir", str(run_dir), *argv])).export_spec()
    model = build_model(spec["model"], spec["size"], **spec["kwargs"])
    save_exported(model.state_dict(), spec, run_dir)
    return model


def test_export_holds_the_resolved_config_in_both_files(tmp_path):
    model = export(tmp_path, ["--arch.depth", "1"])
    spec = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert spec["kwargs"]["depth"] == 1 and spec["kwargs"]["num_heads"] == 8 and spec["kwargs"]["rope"] is False
    from safetensors import safe_open

    with safe_open(str(tmp_path / MODEL_FILE), "pt") as f:
        assert json.loads(f.metadata()[METADATA_KEY]) == spec
    loaded = load_exported(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def rewrite_config(run_dir: Path, **kwargs) -> None:
    spec = json.loads((run_dir / CONFIG_FILE).read_text())
    spec["kwargs"].update(kwargs)
    (run_dir / CONFIG_FILE).write_text(json.dumps(spec))


@pytest.mark.parametrize("change", [{"num_heads": 4}, {"rope": True}, {"pos_embed": "none"}])
def test_load_exported_refuses_a_config_that_differs_from_the_header(change, tmp_path):
    export(tmp_path, [])
    rewrite_config(tmp_path, **change)
    field = f"kwargs.{next(iter(change))}"
    with pytest.raises(ValueError, match=rf"field\(s\) \['{field}'\] differ from the config in its header"):
        load_exported(tmp_path)


def test_load_exported_refuses_integer_weights_missing_header_and_extra_tensors(tmp_path):
    model = export(tmp_path, [])
    state = model.state_dict()
    header = {METADATA_KEY: (tmp_path / CONFIG_FILE).read_text()}
    save_file({**state, "norm.weight": state["norm.weight"].to(torch.int32)}, str(tmp_path / MODEL_FILE), header)
    with pytest.raises(ValueError, match=r"tensor norm.weight is stored as torch.int32, but the model's norm.weight"):
        load_exported(tmp_path)
    save_file({**state, "extra": torch.zeros(1)}, str(tmp_path / MODEL_FILE), header)
    with pytest.raises(ValueError, match=r"(?s)does not fit the model of .*Unexpected key\(s\) in state_dict: .extra"):
        load_exported(tmp_path)
    save_file(state, str(tmp_path / MODEL_FILE))
    with pytest.raises(ValueError, match=rf"has no '{METADATA_KEY}' header metadata"):
        load_exported(tmp_path)
    save_file(state, str(tmp_path / MODEL_FILE), {METADATA_KEY: "{not json"})
    with pytest.raises(ValueError, match=rf"{MODEL_FILE}: its '{METADATA_KEY}' header metadata is not valid JSON"):
        load_exported(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("depth", "2", r"field kwargs\.depth is '2' \(str\), but mae takes a int there"),
        ("qkv_bias", [1], r"field kwargs\.qkv_bias is \[1\] \(list\), but mae takes a bool there"),
        ("num_heads", None, r"its 'kwargs' do not build a mae model"),
    ],
)
def test_load_exported_names_a_field_of_the_wrong_type(field, value, match, tmp_path):
    export(tmp_path, [])
    spec = json.loads((tmp_path / CONFIG_FILE).read_text())
    spec["kwargs"][field] = value
    state = load_file(str(tmp_path / MODEL_FILE))
    save_exported(state, spec, tmp_path)  # both copies agree: only the type is wrong
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / CONFIG_FILE)) + ": " + match):
        load_exported(tmp_path)


def test_load_exported_names_a_missing_or_broken_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / CONFIG_FILE} does not exist")):
        load_exported(tmp_path)
    export(tmp_path, [])
    (tmp_path / MODEL_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / MODEL_FILE} does not exist")):
        load_exported(tmp_path)
    export(tmp_path, [])
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=r"model_config.json is not valid JSON"):
        load_exported(tmp_path)
    (tmp_path / CONFIG_FILE).write_bytes(b"\x80\x04 a pickle, not JSON")
    with pytest.raises(ValueError, match=r"model_config.json is not valid JSON \('utf-8' codec can't decode"):
        load_exported(tmp_path)


# --- options the data decides -----------------------------------------------------------------

_OPENED: list[str] = []
_WATCH: list[str] = []  # the directory whose opened files _OPENED records (empty: none)


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _WATCH and isinstance(args[0], str) and args[0].startswith(_WATCH[0]):
        _OPENED.append(args[0])


sys.addaudithook(_audit)


def test_the_command_line_opens_no_data_file_and_validation_fills_the_options(tmp_path):
    """The input size follows --data.tile and the channels the files' header, but the parser only
    leaves them to the data (None); reading the header belongs to validation."""
    from data_files import nifti_dataset

    root = nifti_dataset(tmp_path / "ct", 2, (24, 20, 16))
    argv = [
        *["--model", "mae", "--data.kind", "nifti", "--data.root", str(root), "--data.tile", "16", "16", "16"],
        *["--run.dir", str(tmp_path / "run")],
    ]
    _OPENED.clear()
    _WATCH[:] = [str(root)]
    try:
        cfg = parse(argv)
        assert _OPENED == [] and cfg.arch.img_size is None and cfg.arch.in_chans is None
        plan = validate_config(cfg)
        assert _OPENED, "validation reads the first file's header"
    finally:
        _WATCH.clear()
    assert plan.cfg.arch.img_size == (16, 16, 16) and plan.cfg.arch.in_chans == 1
    assert tuple(plan.model.img_size) == (16, 16, 16) and plan.model.data_chans == 1
    assert cfg.arch.in_chans is None, "validate_config resolves a copy; the caller's config is not changed"
    given = parse([*argv, "--arch.in-chans", "2", "--arch.img-size", "16", "16", "16"])
    assert given.arch.in_chans == 2 and validate_config(given).cfg.arch.in_chans == 2  # a flag wins over the data


def test_each_model_has_its_own_default_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for model in ("mae", "unetr"):
        assert validate_config(parse(["--model", model])).run_dir.resolve() == (tmp_path / "runs" / model).resolve()
    assert parse(["--model", "mae"]).run.dir is None, "the default is resolved with the run, from its model"
    assert not (tmp_path / "runs").exists(), "validation writes nothing"


def test_fewer_model_classes_than_data_classes_is_refused(tmp_path):
    from ucfvit.train.cli import parse
    from ucfvit.train.plan import validate_config

    cfg = parse(["--model", "vit", "--arch.num-classes", "2", "--run.dir", str(tmp_path)])
    with pytest.raises(ValueError, match=r"--arch.num-classes=2 is smaller than the 3 classes of the data"):
        validate_config(cfg)
    assert validate_config(parse(["--model", "vit", "--run.dir", str(tmp_path)])).model.num_classes == 3


def test_a_run_dir_inside_an_image_data_root_is_refused_naming_both(tmp_path):
    from data_files import image_folder

    root = image_folder(tmp_path / "images", 2, 1)
    argv = ["--model", "vit", "--data.kind", "imagefolder", "--data.root", str(root)]
    with pytest.raises(ConfigError, match=rf"--run\.dir {root}/runs/a lies inside --data\.root {root}: the run's"):
        validate_config(parse([*argv, "--run.dir", str(root / "runs" / "a")]))
    assert not (root / "runs").exists()
    validate_config(parse([*argv, "--run.dir", str(tmp_path / "run")]))


def test_a_run_dir_too_long_for_its_checkpoint_files_is_refused_before_anything_is_written(tmp_path):
    from ucfvit.train.plan import check_path_length

    path_max = os.pathconf(tmp_path, "PC_PATH_MAX")
    room = path_max - 50 - len(str(tmp_path))  # room for the run dir, not for abandoned/.../step-N/shard
    deep = Path(tmp_path, *["d" * 200] * (room // 201), "d" * (room % 201 or 1))
    with pytest.raises(ConfigError, match=r"--run\.dir /.*\.\.\.d+ is too long \(\d+ bytes\): the run writes files"):
        validate_config(parse(["--model", "vit", "--run.dir", str(deep)]))
    with pytest.raises(ValueError, match=r"a name in it \(x{20}\.\.\.\) has 300 bytes, more than the 255"):
        check_path_length(tmp_path / ("x" * 300), 60, 1)
    check_path_length(tmp_path / "run", 60, 1)
    assert list(tmp_path.iterdir()) == []


def test_check_argv_gives_the_trainers_own_message_in_one_line():
    from ucfvit.train.cli import check_argv

    with pytest.raises(ConfigError) as err:
        check_argv(["--model", "mae", "--max-stepz", "10"], accelerator=True)
    assert "\n" not in str(err.value)
    assert "Unrecognized options: --max-stepz, 10 (did you mean --max-steps?)" in str(err.value)
    with pytest.raises(ConfigError, match=r"--optim\.lr=nan is out of range"):
        check_argv(["--model", "mae", "--optim.lr", "nan"])
    assert check_argv(["--model", "mae", "--max-steps", "10"], accelerator=True).max_steps == 10
