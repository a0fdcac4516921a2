"""--init.from: fine-tuning starts from a ucfvit run, its export, or another project's checkpoint,
on a parallel mesh; bad weights stop every rank before any collective."""

from __future__ import annotations

from distributed import run_ranks


def test_init_from_run_dir_export_and_mae_reference_on_1x2x2(tmp_path):
    results = run_ranks(4, "init_cases:fine_tune", str(tmp_path), "1x2x2", timeout=400)
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
