"""Checkpoints in one process: optimizer hyperparameters and state round-trip exactly, the reader
refuses pickled (BYTE_IO) items, and saving a step again keeps a copy through a crash. Tampered
checkpoints and failing saves on several ranks: tests/distributed/test_checkpoint_trust.py."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from ucfvit.train import checkpoint as ckpt_module
from ucfvit.train.checkpoint import Checkpointer, CheckpointError, is_complete
from ucfvit.train.dcp_reader import SafeReader, verify_checkpoint
from ucfvit.train.manifest import verify_structure

# These tests save and load without a process group, which DCP warns about.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def tiny(lr: float, betas: tuple[float, float]) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}], lr=lr, betas=betas
    )
    return model, optimizer


def test_optimizer_hyperparameters_and_state_round_trip_exactly(tmp_path):
    torch.manual_seed(0)
    model, optimizer = tiny(lr=1e-3 / 3, betas=(0.9, 0.95))
    model(torch.randn(3, 4)).square().mean().backward()
    optimizer.step()
    ckpt = Checkpointer(tmp_path, keep=1).save(1, model, optimizer, {"step": 1}, {"model": "tiny"})
    verify_checkpoint(ckpt)
    other, fresh = tiny(lr=0.5, betas=(0.1, 0.2))
    assert Checkpointer(tmp_path, keep=1).load(ckpt, other, fresh) == {"step": 1}

    def hyper(opt):
        return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]

    assert repr(hyper(fresh)) == repr(hyper(optimizer))  # same values and types (betas stays a tuple)
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q)
        assert all(torch.equal(optimizer.state[p][k], fresh.state[q][k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_reader_refuses_byte_io_items(tmp_path):
    model, optimizer = tiny(lr=1e-3, betas=(0.9, 0.95))
    ckpt = Checkpointer(tmp_path, keep=1).save(1, model, optimizer, {}, {})
    reader = SafeReader(ckpt, verify_structure(ckpt))
    reader.set_up_storage_reader(reader.read_metadata(), True)
    index = next(iter(reader.storage_data))
    item = ReadItem(LoadItemType.BYTE_IO, MetadataIndex("optim.param_groups.0.lr"), [], index, [], [])
    with pytest.raises(CheckpointError, match=r"refusing to read 'optim.param_groups.0.lr' from .*__0_0.distcp"):
        reader.read_data(LoadPlan([item]), planner=None)


def test_saving_a_step_again_keeps_a_copy_through_a_crash(tmp_path, monkeypatch):
    model, optimizer = tiny(lr=1e-3, betas=(0.9, 0.95))
    checkpointer = Checkpointer(tmp_path, keep=2)
    checkpointer.save(1, model, optimizer, {"save": 1}, {})
    real_replace = os.replace

    def crash_after_moving_the_old_copy_aside(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(".old"):
            raise KeyboardInterrupt("crash")

    monkeypatch.setattr(ckpt_module.os, "replace", crash_after_moving_the_old_copy_aside)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save(1, model, optimizer, {"save": 2}, {})
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert json.loads((root / "step-00000001.old" / "trainer_state.json").read_text()) == {"save": 1}
    assert (root / "step-00000001.tmp" / "manifest.json").is_file()  # the new copy, complete
    checkpointer.save(1, model, optimizer, {"save": 3}, {})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001"]
    assert is_complete(root / "step-00000001")
    assert json.loads((root / "step-00000001" / "trainer_state.json").read_text()) == {"save": 3}


def rewrite_and_rehash(ckpt, name: str, change) -> None:
    """Change JSON file ``name`` of ``ckpt`` with ``change(data)`` and recompute its manifest entry, as
    a hand edit that also fixed the hashes would."""
    path = ckpt / name
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"].update(ckpt_module.file_entries(ckpt, [name]))
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def saved_run(tmp_path):
    model, optimizer = tiny(lr=1e-3, betas=(0.9, 0.95))
    state = {"step": 1, "data_positions": {"npy": 4}, "lr": 1e-3, "rng": ckpt_module.encode_rng()}
    config = {"model": "vit", "model_size": "debug", "arch": {}}
    return Checkpointer(tmp_path, keep=1).save(1, model, optimizer, state, config), model, optimizer


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda s: s.update(step="1"), "step"),
        (lambda s: s.pop("step"), "step"),
        (lambda s: s.update(data_positions=[4]), "data_positions"),
        (lambda s: s["rng"].update(torch="not base64!"), "rng"),
        (lambda s: s.update(lr=None), "lr"),
    ],
)
def test_a_trainer_state_of_wrong_types_is_refused_naming_file_and_field(tmp_path, change, field):
    ckpt, model, optimizer = saved_run(tmp_path)
    rewrite_and_rehash(ckpt, "trainer_state.json", change)
    state = Checkpointer(tmp_path, keep=1).load(ckpt, model, optimizer)  # the manifest matches: loads
    with pytest.raises(CheckpointError, match=rf"trainer_state\.json: field {field} is .*, not "):
        ckpt_module.check_trainer_state(state, ckpt)


def test_optimizer_and_config_json_of_wrong_types_are_refused_naming_file_and_field(tmp_path):
    ckpt, model, optimizer = saved_run(tmp_path)
    rewrite_and_rehash(ckpt, "optimizer.json", lambda o: o["param_groups"][0]["values"].update(lr="fast"))
    with pytest.raises(CheckpointError, match=r"optimizer\.json: field param_groups\[0\]\.lr is 'fast', where"):
        Checkpointer(tmp_path, keep=1).load(ckpt, model, optimizer)
    rewrite_and_rehash(ckpt, "config.json", lambda c: c.update(arch=["depth", 2]))
    with pytest.raises(CheckpointError, match=r"config\.json: field arch is \['depth', 2\], not a mapping"):
        ckpt_module.read_checkpoint_config(ckpt)
