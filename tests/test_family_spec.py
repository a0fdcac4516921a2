"""The family spec is the one declaration of a family: a family defined in this file trains through
``ucfvit.train.train``; the CLI's choices and options derive from the registry; configs round-trip."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distributed import run_ranks
from ucfvit.models import FamilySpec, VisionTransformer, get_family, list_models, register_family
from ucfvit.models.registry import FAMILIES, model_arguments
from ucfvit.train.cli import parse
from ucfvit.train.config import ARCH_OPTIONS, ArchConfig, Config, load_config
from ucfvit.train.model_options import INTERNAL, options_table
from ucfvit.train.optim import build_optimizer
from ucfvit.train.plan import model_kwargs
from ucfvit.train.presets import preset


# ---------------------------------------------------------------- a family defined only here
class IntensityRegressor(VisionTransformer):
    """Predicts each channel's mean intensity from the mean of the encoder's patch tokens."""

    def __init__(self, **encoder_kwargs):
        super().__init__(**encoder_kwargs)
        self.head = nn.Linear(self.embed_dim, self.in_chans)

    def forward(self, x, variables=None, *, rng=None):
        tokens = self.forward_features(x, variables, rng=rng)
        return self.head(tokens[:, self.num_prefix_tokens :].mean(dim=1))


def _regression_loss(model, batch, rng, extra):
    x = batch["image"]
    return F.mse_loss(model(x, rng=rng).float() * extra, x.flatten(2).mean(-1) * extra)


TOY = FamilySpec(
    "toy", IntensityRegressor, loss=_regression_loss, extra=lambda model: 2.0,
    recipe={"arch.class_token": False, "optim.lr": 1e-3},
)  # fmt: skip


def train_toy(run_dir: str) -> dict:
    """In a fresh rank process: register the toy family, then train it 2 steps by the CLI path."""
    from ucfvit.train import train

    register_family(TOY)
    cfg = parse(["--model", "toy", "--max-steps", "2", "--metrics.log-every", "1", "--run.dir", run_dir])
    result = train(cfg)
    return {"steps": result.steps_done, "loss": result.last_loss, "choices": list_models(),
            "lr": cfg.optim.lr, "class_token": result.model.cls_token is not None}  # fmt: skip


def test_a_family_defined_in_a_test_file_trains_through_the_trainer(tmp_path):
    r = run_ranks(1, "test_family_spec:train_toy", str(tmp_path))[0]
    assert r["steps"] == 2 and math.isfinite(r["loss"]), r
    assert "toy" in r["choices"] and r["lr"] == 1e-3 and r["class_token"] is False  # its recipe applied
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert "toy" not in list_models(), "the registration lived in the rank process only"


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="'vit' is already registered"):
        register_family(dataclasses.replace(TOY, name="vit"))
    assert FAMILIES["vit"].model.__name__ == "ViT"


# ---------------------------------------------------------------- command line
def _help(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse([*argv, "--help"])
    return out.getvalue()


def test_cli_model_choices_equal_the_registry():
    text = _help(["--model", "vit"])
    choices = re.search(r"--model \{([^}]*)\}", text).group(1).split(",")
    assert choices == list_models()
    with pytest.raises(SystemExit):
        parse(["--model", "resnet"])


def test_every_constructor_option_is_a_documented_cli_option():
    fields = {f.name for f in dataclasses.fields(ArchConfig)}
    for name, spec in FAMILIES.items():
        missing = model_arguments(spec.model) - INTERNAL - fields
        assert not missing, f"{name}: constructor options without --arch flag: {sorted(missing)}"
    undocumented = [n for n, o in ARCH_OPTIONS.items() if not o.help]
    assert not undocumented, f"options without a docstring entry: {undocumented}"
    text = _help(["--model", "mae"])
    assert "--arch.mask-ratio" in text and "[mae]" in text


def test_the_models_page_lists_every_option_with_where_it_applies():
    page = (Path(__file__).parents[1] / "docs" / "models.md").read_text()
    listed = page.split("<!-- options:start -->\n")[1].split("\n<!-- options:end -->")[0]
    expected = options_table(ARCH_OPTIONS)
    assert listed == expected, f"docs/models.md's option table is stale; replace it by:\n{expected}"


def test_an_option_the_family_does_not_take_is_an_error_naming_who_does():
    cfg = parse(["--model", "vit", "--arch.mask-ratio", "0.5"])
    with pytest.raises(
        ValueError, match=r"--model vit does not take \['mask_ratio'\] \(--arch.mask-ratio applies to mae\)"
    ):
        model_kwargs(cfg)
    assert model_kwargs(parse(["--model", "mae", "--arch.mask-ratio", "0.5"]))["mask_ratio"] == 0.5


def test_recipes_take_the_family_defaults():
    assert preset("vit", accelerator=False).arch.num_classes == 3
    assert preset("mae", accelerator=False).arch.num_classes is None  # mae has no classes
    assert preset("mae", accelerator=True).arch.patch_size == 16


@pytest.mark.parametrize("model", ["vit", "mae", "unetr", "sap", "diffusion"])
def test_gpu_recipes_train_fast_by_default(model):
    # on a GPU: bf16 compute over fp32 master weights, compiled (whole-model where the mesh shards
    # nothing), fused AdamW; on a CPU: fp32 and eager, so a laptop run starts at once
    gpu = preset(model, accelerator=True).parallel
    assert (gpu.param_dtype, gpu.compile, gpu.wrap) == ("bfloat16", True, "auto")
    options = gpu.parallelize_options("cuda")
    assert options["param_dtype"] is torch.bfloat16 and options["compile"] is True and options["wrap"] == "auto"
    cpu = preset(model, accelerator=False).parallel
    assert cpu.parallelize_options("cpu")["param_dtype"] is None and cpu.compile is False
    cfg = preset(model, accelerator=True)
    assert build_optimizer(torch.nn.Linear(2, 2), cfg, "cuda").defaults["fused"] is True


# ---------------------------------------------------------------- --config FILE
def test_a_saved_config_loads_back_as_the_defaults(tmp_path):
    cfg = parse(["--model", "unetr", "--arch.img-size", "16", "16", "16", "--optim.lr", "3e-4", "--arch.rope", "True"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    loaded = load_config(path)
    assert loaded.to_dict() == cfg.to_dict() and isinstance(loaded, Config)
    again = parse(["--config", str(path), "--max-steps", "7"])
    assert again.arch.img_size == (16, 16, 16) and again.optim.lr == 3e-4 and again.arch.rope is True
    assert again.max_steps == 7 and again.model == "unetr"
    with pytest.raises(ValueError, match=r"--model vit contradicts --config"):
        parse(["--config", str(path), "--model", "vit"])


def test_a_partial_config_file_goes_on_top_of_the_recipe(tmp_path):
    path = tmp_path / "part.json"
    path.write_text(json.dumps({"arch": {"depth": 1}, "optim": {"lr": 0.5}}))
    cfg = parse(["--model", "vit", "--config", str(path), "--max-steps", "3"])
    recipe = parse(["--model", "vit"])
    assert cfg.model == "vit" and cfg.arch.depth == 1 and cfg.optim.lr == 0.5 and cfg.max_steps == 3
    assert cfg.arch.num_classes == recipe.arch.num_classes and cfg.optim.weight_decay == recipe.optim.weight_decay
    path.write_text(json.dumps({"model": "nope"}))
    with pytest.raises(ValueError, match=r"part.json: model 'nope' is unknown; choose one of \['vit'"):
        parse(["--config", str(path)])


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"model": "mae", "optim": {"lr": 1, "momentum": 0.9}}', r"unknown field\(s\) \['optim.momentum'\]"),
        ("{not json", "not valid JSON"),
        ('{"arch": 3}', r"field arch: expected a mapping, got int"),
        ('{"arch": {"depth": "deep"}}', r"field arch.depth: 'deep' is not of type int \| None"),
        ('{"arch": {"img_size": [32, "x"]}}', r"field arch.img_size: \(32, 'x'\) is not of type tuple\[int, \.\.\.\]"),
        ('{"optim": {"lr": true}}', r"field optim.lr: True is not of type float"),
        ('{"parallel": {"param_dtype": "float64"}}', r"field parallel.param_dtype: 'float64' is not of type Literal"),
    ],
)
def test_a_bad_config_file_is_a_clear_error(tmp_path, text, match):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(path)
    with pytest.raises(ValueError, match="cannot read it"):
        load_config(tmp_path / "missing.json")


def test_a_binary_or_malformed_yaml_config_is_a_clear_error(tmp_path, monkeypatch):
    import pickle
    import types

    binary = tmp_path / "config.json"
    binary.write_bytes(pickle.dumps({"model": "vit"}))  # e.g. a pickle where a config was expected
    with pytest.raises(ValueError, match=r"config.json: not a text file \(byte 0 is not UTF-8\)"):
        load_config(binary)

    class YAMLError(Exception):
        pass

    def safe_load(text):
        raise YAMLError("mapping values are not allowed here\n  in line 1, column 6")

    # PyYAML is optional (not installed in CI): stand in for it, as its loader fails on bad YAML.
    monkeypatch.setitem(sys.modules, "yaml", types.SimpleNamespace(safe_load=safe_load, YAMLError=YAMLError))
    bad = tmp_path / "config.yaml"
    bad.write_text("a: b: c")
    with pytest.raises(ValueError, match=r"config.yaml: not valid YAML \(mapping values .* column 6\)$"):
        load_config(bad)


def test_the_recipe_reports_a_bad_option_in_one_line_without_traceback(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, str(Path(__file__).parents[1] / "recipes" / "train.py"), "--model", "vit"]
    out = subprocess.run([*cmd, "--arch.mask-ratio", "0.5", "--run.dir", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines() == [
        "recipes/train.py: error: --model vit does not take ['mask_ratio'] (--arch.mask-ratio applies to mae); "
        "remove the option or pick another --model"
    ]


def test_spec_inputs_and_extra_of_the_built_in_families():
    x = torch.randn(2, 3, 16, 16)
    for name in ("vit", "mae", "unetr", "sap", "diffusion"):
        spec = get_family(name)
        model = get_family(name).model(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2)
        model.init_weights()
        out = model(*spec.inputs(model, {"image": x}))
        assert torch.isfinite(out[0] if isinstance(out, tuple) else out).all(), name
    assert get_family("diffusion").build_extra(model).num_steps == model.time_steps
    assert get_family("vit").build_extra(None) is None
