"""The family spec is the one declaration of a family: the CLI's choices and options derive from the
registry, the recipes take the family defaults, and the spec feeds each built-in family its inputs.
A family defined in a test file trains through ``ucfvit.train.train``: tests/e2e/test_family_spec.py;
--config FILE: test_config_file.py."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from pathlib import Path

import pytest
import torch

from ucfvit.models import get_family, list_models
from ucfvit.models.registry import FAMILIES, model_arguments
from ucfvit.train.cli import parse
from ucfvit.train.config import ARCH_OPTIONS, ArchConfig
from ucfvit.train.model_options import INTERNAL, options_table
from ucfvit.train.optim import build_optimizer
from ucfvit.train.plan import model_kwargs
from ucfvit.train.presets import preset


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
    page = (Path(__file__).parents[2] / "docs" / "models.md").read_text()
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


# ---------------------------------------------------------------- the spec's inputs


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
