"""Bad input, table-driven: every case exits 2 with one line naming the key, flag or file, before any heavy work
(no process group, no model loaded where the table says so), and nothing the user had is changed."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_ldm_overrides


def tree_digest(*paths: Path) -> dict[str, str]:
    """sha256 of every file under the paths (or of the file), by path: 'nothing changed' means equal digests."""
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def run_cli(main, argv, capsys) -> str:
    """Run a CLI's main; it must exit 2; returns its one-line error (the last stderr line)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().replace("\r", "\n").splitlines()
    assert e.value.code == 2, (argv, err[-5:])
    return err[-1]


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Starting the process group (DeepSpeed) means heavy work began: fail the test if it happens."""
    import ldm.train.trainer as trainer_mod

    def refuse(*args, **kwargs):
        raise AssertionError("the process group was started before the bad input was found")

    monkeypatch.setattr(trainer_mod, "init_distributed", refuse)


def test_train_bad_inputs_fail_at_start(tmp_path, tiny_shards, tiny_autoencoder, capsys, no_heavy_work):
    from ldm.cli.train import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not shards")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "a_file").write_text("user data")
    (tmp_path / "config_dir").mkdir()
    config = str(ROOT / "configs/ldm/emoji.yaml")
    out = tmp_path / "run"
    base = tiny_ldm_overrides(tiny_shards, tiny_autoencoder, out, None)
    cases = [
        (["data.train=" + str(tmp_path / "missing")], "data.train:"),
        (["data.train=" + str(tmp_path / "empty")], "data.train:"),
        (["data.train=" + str(tmp_path / "notes.txt")], "data.train:"),
        (["autoencoder.path=" + str(tmp_path / "no_vae")], "autoencoder.path:"),
        (["text_encoder.path=" + str(tmp_path / "no_text")], "text_encoder.path:"),
        (["model.preset=unknown"], "model.preset: unknown preset 'unknown'"),
        (["text_encoder.max_length=0"], "text_encoder.max_length: must be a positive number"),
        (["train.lr=nan"], "train.lr: must be a positive number"),
        (["train.lr=-1"], "train.lr: must be a positive number"),
        (["run.output_dir=" + str(tmp_path / "a_file")], "run.output_dir:"),
        (["sampling.sampler=bogus"], "sampling.sampler: unknown sampler 'bogus'"),
        (["sampling.steps=5000"], "steps must be in [1, 1000], got 5000"),
        (["eval.sampler=bogus"], "eval.sampler: unknown sampler 'bogus'"),
        (["diffusion.process=flow", "diffusion.prediction=velocity", "sampling.sampler=euler_maruyama"],
         "sampling.sampler/sampling.steps: euler_maruyama: the forward SDE of FlowMatching is singular at t = 1.0"),
        (["data.image_size=15"], "data.image_size: 15 is not divisible"),
        (["eval.every=5", "data.val=null"], "data.val:"),
        (["train.val_every=5", "data.val=" + str(tmp_path / "missing")], "data.val:"),
    ]
    before = tree_digest(tiny_shards, tiny_autoencoder, tmp_path / "a_file")
    for overrides, needle in cases:
        line = run_cli(main, ["--config", config, *base, *overrides], capsys)
        assert line.startswith("error:") and needle in line, (overrides, line)
    for argv, needle in ((["--config", str(tmp_path / "empty.yaml")], "is empty"),
                         (["--config", str(tmp_path / "config_dir")], "is a folder")):
        line = run_cli(main, argv, capsys)
        assert needle in line, (argv, line)
    assert not out.exists()  # nothing written: no config.yaml, no null condition
    assert tree_digest(tiny_shards, tiny_autoencoder, tmp_path / "a_file") == before


def test_resume_with_another_model_is_refused(tmp_path, tiny_ldm_run, tiny_shards, tiny_autoencoder, capsys,
                                              no_heavy_work):
    from ldm.cli.train import main

    run = tmp_path / "run"
    shutil.copytree(tiny_ldm_run, run)
    before = tree_digest(run)
    base = tiny_ldm_overrides(tiny_shards, tiny_autoencoder, run, None)
    for overrides, needle in ((["diffusion.prediction=v"], "diffusion.prediction: 'eps' -> 'v'"),
                              (["model.preset=emoji-cpu"], "model.preset: 'tiny' -> 'emoji-cpu'")):
        line = run_cli(main, ["--config", str(ROOT / "configs/ldm/emoji.yaml"), *base, "train.max_steps=6",
                              *overrides], capsys)
        assert "run.output_dir" in line and needle in line, line
    assert tree_digest(run) == before


def test_truncated_files_are_named(tmp_path, tiny_ldm_run, capsys):
    from ldm.cli.export import main as export_main
    from ldm.cli.sample import main as sample_main

    run = tmp_path / "run"
    shutil.copytree(tiny_ldm_run, run)
    weights = run / "export" / "unet_ema.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short
    line = run_cli(sample_main, ["--model", str(run / "export"), "--prompt", "red apple", "--steps", "2",
                                 "--out", str(tmp_path / "samples")], capsys)
    assert str(weights) in line and "truncated or corrupt" in line, line
    ema = run / "checkpoints" / "step00000004" / "ema_rank0.safetensors"
    ema.write_bytes(ema.read_bytes()[:100])
    line = run_cli(export_main, [str(run), "--out", str(tmp_path / "exported")], capsys)
    assert str(ema) in line and "truncated or corrupt" in line, line
    assert not (tmp_path / "exported").exists()


def test_sample_and_eval_usage_errors_before_models_load(tmp_path, tiny_ldm_run, capsys, monkeypatch):
    import ldm.assemble as assemble_mod
    from ldm.cli.evaluate import main as eval_main
    from ldm.cli.sample import main as sample_main

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was found")

    monkeypatch.setattr(assemble_mod, "assemble", refuse)
    (tmp_path / "a_file").write_text("user data")
    model = str(tiny_ldm_run / "export")
    sample = ["--model", model, "--prompt", "red apple"]
    cases = [
        (sample_main, [*sample, "--out", str(tmp_path / "a_file")], "--out:"),
        (sample_main, [*sample, "--device", "bogus"], "--device: unknown device 'bogus'"),
        (sample_main, [*sample, "--steps", "5000"], "--steps: steps must be in [1, 1000], got 5000"),
        (sample_main, [*sample, "--spacing", "bogus"], "--spacing: unknown spacing 'bogus'"),
        (sample_main, [*sample, "--guidance", "nan"], "--guidance: must be a finite number"),
        (sample_main, [*sample, "--guidance", "inf"], "--guidance: must be a finite number"),
        (eval_main, ["--model", model, "--guidance", "nan"], "--guidance: must be a finite number"),
        (eval_main, ["--model", model, "--out", str(tmp_path / "a_file")], "--out:"),
    ]
    before = tree_digest(tiny_ldm_run, tmp_path / "a_file")
    for main, argv, needle in cases:
        line = run_cli(main, argv, capsys)
        assert line.startswith("error:") and needle in line, (argv, line)
    assert tree_digest(tiny_ldm_run, tmp_path / "a_file") == before


def test_export_replaces_only_a_previous_export(tmp_path, tiny_ldm_run, capsys):
    from ldm.cli.export import main as export_main

    run = tmp_path / "run"
    shutil.copytree(tiny_ldm_run, run)
    mine = tmp_path / "my_files"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    (tmp_path / "a_file").write_text("user data")
    before = tree_digest(run, mine, tmp_path / "a_file")
    for target, needle in ((mine, "is a folder that is not an export"), (tmp_path / "a_file", "is a file"),
                           (run, "is a folder that is not an export")):
        line = run_cli(export_main, [str(run), "--out", str(target)], capsys)
        assert str(target) in line and needle in line, line
    assert tree_digest(run, mine, tmp_path / "a_file") == before
    assert export_main([str(run)]) == 0  # the run's own previous export is replaced
    assert (run / "export" / "export.json").is_file()


def test_model_from_a_run_folder_writes_nothing(tmp_path, tiny_ldm_run):
    from ldm.cli._common import load_model

    run = tmp_path / "run"
    shutil.copytree(tiny_ldm_run, run)
    shutil.rmtree(run / "export")
    before = tree_digest(run)
    pipe, cfg = load_model(str(run), "cpu")
    images = pipe.generate(["red apple"], [0], sampler="ddim", steps=2, progress=False)
    assert images.shape == (1, 3, 16, 16)
    assert tree_digest(run) == before and not (run / "export").exists()


def test_shards_and_likelihood_usage_errors(tmp_path, tiny_ldm_run, capsys):
    from ldm.cli.likelihood import main as likelihood_main
    from ldm.cli.shards import main as shards_main

    (tmp_path / "a_file").write_text("user data")
    with pytest.raises(SystemExit) as e:
        shards_main(["emoji", "--out", str(tmp_path / "a_file")])
    assert e.value.code == 2 and "--out:" in capsys.readouterr().err
    assert (tmp_path / "a_file").read_text() == "user data"
    line = run_cli(likelihood_main, ["--model", str(tiny_ldm_run / "export"), "--elbo-terms", "5000", "--no-tracking",
                                     "--out", str(tmp_path / "lik")], capsys)
    assert "--elbo-terms" in line and "5000" in line, line


def test_a_corrupt_shard_is_reported_once(tmp_path, tiny_shards, tiny_autoencoder, capsys, caplog, no_heavy_work):
    import logging

    from ldm.cli.train import main
    from ldm.data import make_loader

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train-000000.tar").write_bytes(b"this is not a tar archive" * 100)
    overrides = tiny_ldm_overrides(bad, tiny_autoencoder, tmp_path / "run", None)
    line = run_cli(main, ["--config", str(ROOT / "configs/ldm/emoji.yaml"), *overrides, "data.val=null"], capsys)
    assert "data.train: no readable shard" in line and "train-000000.tar" in line, line  # at start, one line

    # among good shards, a resampled stream meets it again and again: one warning, one count, the rest streams
    good = sorted(str(p) for p in tiny_shards.glob("train-*.tar"))
    with caplog.at_level(logging.WARNING, logger="ldm.data.stream"):
        batches = list(make_loader([str(bad / "train-000000.tar"), *good], batch_size=2, image_size=16,
                                   batches_per_epoch=12, shuffle_buffer=0))
    assert len(batches) == 12 and batches[-1]["skipped"] == 1
    assert len([r for r in caplog.records if "train-000000.tar" in r.getMessage()]) == 1
    with pytest.raises(RuntimeError, match="no sample can be read: all 1 shard"):  # nothing usable: one line
        list(make_loader([str(bad / "train-000000.tar")], batch_size=2, image_size=16, batches_per_epoch=2))
