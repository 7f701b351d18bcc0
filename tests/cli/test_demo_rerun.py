"""ldm-demo run again: the finished stages are skipped (shards, the stage-1 autoencoder: not trained again, its
numbers printed from its record), a finished LDM run trains no step, and an LDM run given more steps resumes from its
last checkpoint."""

from __future__ import annotations

import re

import yaml

from tests.conftest import ROOT, resumed_line, tiny_ldm_overrides


def test_rerun_skips_finished_stages_and_resumes(tmp_path, tiny_shards, trained_steps, capsys, monkeypatch):
    import ldm.train.autoencoder as stage1
    from ldm.cli.demo import main as demo_main

    ae_cfg = yaml.safe_load((ROOT / "configs/autoencoder/emoji.yaml").read_text())
    ae_cfg["run"]["output_dir"] = str(tmp_path / "autoencoder")
    ae_cfg["data"].update(image_size=16, batch_size=4)
    ae_cfg["model"].update(block_out_channels=[8, 16], norm_num_groups=8, latent_channels=4)
    ae_cfg["train"].update(steps=3, scale_batches=2, log_every=1)
    ae_cfg["eval"]["rfid"] = False
    ae_cfg["tracking"] = {"enabled": False}
    (tmp_path / "ae.yaml").write_text(yaml.safe_dump(ae_cfg))
    out = tmp_path / "ldm"
    argv = ["--data", str(tiny_shards), "--autoencoder-config", str(tmp_path / "ae.yaml"),
            *tiny_ldm_overrides(tiny_shards, tmp_path / "autoencoder", out, None, recipe="default"), "train.max_steps=2"]
    stage1_runs = []
    real_stage1 = stage1.train_stage1
    monkeypatch.setattr(stage1, "train_stage1", lambda cfg: stage1_runs.append(1) or real_stage1(cfg))

    assert demo_main(argv) == 0
    first = capsys.readouterr().out
    assert stage1_runs == [1] and trained_steps == [1, 2]
    assert "[2/3] training the stage-1 autoencoder" in first and "stage 1: held-out PSNR" in first
    assert re.search(r"done in [\d.]+ min: shards [\d.]+ min, stage 1 [\d.]+ min, LDM \(training, grid, evaluation, "
                     r"export\) [\d.]+ min", first)  # each stage's time

    assert demo_main(argv) == 0  # everything finished: nothing is trained again
    again = capsys.readouterr().out
    assert stage1_runs == [1] and trained_steps == [1, 2]
    assert f"[1/3] shards present in {tiny_shards}" in again
    assert f"[2/3] autoencoder present in {tmp_path / 'autoencoder'}" in again and "stage 1: held-out PSNR" in again
    assert resumed_line(out / "checkpoints", 2) in again

    assert demo_main([*argv, "train.max_steps=4"]) == 0  # a longer LDM run continues from its checkpoint
    longer = capsys.readouterr().out
    assert stage1_runs == [1] and trained_steps == [1, 2, 3, 4]
    assert resumed_line(out / "checkpoints", 2) in longer
