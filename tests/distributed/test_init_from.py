"""--init.from: fine-tuning starts from a ucfvit run, its export, or another project's checkpoint,
on a parallel mesh; bad weights stop every rank before any collective."""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from rank_runner import run_ranks
from reference_models import mae_reference_state
from train_runs import config
from ucfvit.interop import read_weights
from ucfvit.parallel import full_state_dict
from ucfvit.train.trainer import train

ENCODER = ("patch_embed.", "blocks.", "norm.")
FROZEN = [
    "--optim.lr",
    "1e-30",
    "--schedule.warmup-steps",
    "0",
    "--max-steps",
    "1",
]  # one step that changes (almost) nothing


def _encoder(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith(ENCODER)}


def _error(model: str, argv: list[str]) -> str:
    try:
        train(config(model, argv))
    except ValueError as err:
        return str(err)
    return "no error"


def fine_tune(tmp: str, mesh: str) -> dict:
    """An MAE trained on ``mesh`` initialises a UNETR (from its run directory and from its export) and a
    ViT (from an MAE reference checkpoint); each encoder must equal its source. Then the refusals."""
    common = ["--mesh", mesh, "--data.global-batch-size", "4"]
    mae = train(
        config("mae", [*common, "--max-steps", "2", "--run.dir", f"{tmp}/mae", "--checkpoint.export-safetensors"])
    )
    source = _encoder(full_state_dict(mae.model, rank0_only=False))
    out = {}
    for name, path in (("from_run_dir", f"{tmp}/mae"), ("from_export", f"{tmp}/mae/model.safetensors")):
        run = train(config("unetr", [*common, *FROZEN, "--init.from", path, "--run.dir", f"{tmp}/{name}"]))
        got = _encoder(full_state_dict(run.model, rank0_only=False))
        out[name] = {
            "keys": sorted(got) == sorted(source),
            "diff": max((got[k] - source[k]).abs().max().item() for k in source),
        }

    # Linear probing: the encoder stays as loaded, the decoder trains (with layer-wise decay on the rest).
    probe = ["--max-steps", "2", "--init.from", f"{tmp}/mae", "--init.freeze-encoder", "--optim.layer-decay", "0.75"]
    fresh = train(config("unetr", [*common, *FROZEN, "--run.dir", f"{tmp}/fresh"]))  # the decoder before training
    frozen = train(config("unetr", [*common, *probe, "--run.dir", f"{tmp}/probe"]))
    got, before = (full_state_dict(m.model, rank0_only=False) for m in (frozen, fresh))
    out["probe"] = {
        "encoder_diff": max((got[k] - source[k]).abs().max().item() for k in source),
        "decoder_moved": max((got[k] - before[k]).abs().max().item() for k in got if k.startswith("decoder.")),
        "loss": frozen.last_loss,
    }

    if dist.get_rank() == 0:  # an MAE reference checkpoint, written by one rank
        state = mae_reference_state(torch.Generator().manual_seed(0), d=64, depth=2, dd=32, ddepth=1, patch=4, grid=8)
        torch.save({"model": state, "args": argparse.Namespace(model="mae")}, f"{tmp}/ref.pth")
        torch.save({"model": state, "x": _Payload()}, f"{tmp}/evil.pth")
    dist.barrier()
    vit = train(config("vit", [*common, *FROZEN, "--init.from", f"{tmp}/ref.pth", "--run.dir", f"{tmp}/vit"]))
    got = full_state_dict(vit.model, rank0_only=False)
    ref = read_weights(f"{tmp}/ref.pth")["model"]
    out["vit_from_reference"] = max(
        (got["blocks.1.attn.k.weight"] - ref["blocks.1.attn.qkv.weight"][64:128]).abs().max().item(),
        (got["cls_token"] - ref["cls_token"]).abs().max().item(),
        (got["patch_embed.proj.weight"] - ref["patch_embed.proj.weight"]).abs().max().item(),
    )
    out["errors"] = {
        "evil": _error("vit", [*common, "--init.from", f"{tmp}/evil.pth", "--run.dir", f"{tmp}/e1"]),
        "empty_dir": _error("vit", [*common, "--init.from", f"{tmp}", "--run.dir", f"{tmp}/e2"]),
        "freeze_alone": _error("vit", [*common, "--init.freeze-encoder", "--run.dir", f"{tmp}/e4"]),
        "nothing_fits": _error(
            "vit", [*common, "--arch.embed-dim", "32", "--init.from", f"{tmp}/ref.pth", "--run.dir", f"{tmp}/e3"]
        ),
    }
    out["ran"] = os.path.exists(f"{tmp}/pwned")
    return out


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_init_from_run_dir_export_and_mae_reference_on_1x2x2(tmp_path):
    results = run_ranks(4, fine_tune, str(tmp_path), "1x2x2", timeout=400)
    for r in results:
        for name in ("from_run_dir", "from_export"):
            assert r[name]["keys"] and r[name]["diff"] < 1e-12, (name, r[name])
        assert r["vit_from_reference"] < 1e-12, r
        probe = r["probe"]
        assert probe["encoder_diff"] == 0 and probe["decoder_moved"] > 1e-4 and probe["loss"] == probe["loss"], probe
        errors = r["errors"]
        assert "evil.pth: refused: the file holds a Python object" in errors["evil"], errors
        assert "a directory, but no ucfvit checkpoint" in errors["empty_dir"], errors
        assert "no entry of this MAE reference checkpoint" in errors["nothing_fits"], errors
        assert "--init.freeze-encoder keeps pretrained weights fixed" in errors["freeze_alone"], errors
        assert not r["ran"]
