"""--config FILE: a saved config loads back as the defaults, a partial file goes on top of the
recipe, and a bad, binary or malformed file is a clear error (ucfvit.train.config.load_config)."""

from __future__ import annotations

import json
import sys

import pytest

from ucfvit.train.cli import parse
from ucfvit.train.config import Config, load_config


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
    with pytest.raises(ValueError, match=r"missing\.json: no such file \(--config file\)"):
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
    stub = types.SimpleNamespace(
        safe_load=safe_load, YAMLError=YAMLError, parse=lambda text, Loader: [], SafeLoader=None
    )
    monkeypatch.setitem(sys.modules, "yaml", stub)
    bad = tmp_path / "config.yaml"
    bad.write_text("a: b: c")
    with pytest.raises(ValueError, match=r"config.yaml: not valid YAML \(mapping values .* column 6\)$"):
        load_config(bad)
