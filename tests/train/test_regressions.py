"""Regression tests for bugs the copies of the old glue caused: tracking URI from the environment, the evaluation
protocol built and checked at start, skipped samples summed over workers, one fused finiteness check."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ROOT, tiny_ldm_overrides


def test_training_commands_honour_mlflow_tracking_uri(tmp_path, tiny_shards, tiny_autoencoder, monkeypatch):
    from mlflow.tracking import MlflowClient

    from ldm.cli.train import main as train_main
    from ldm.cli.train_autoencoder import main as ae_main

    uri = f"sqlite:///{tmp_path / 'team.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the default store would be tmp_path/runs/mlflow.db
    overrides = [o for o in tiny_ldm_overrides(tiny_shards, tiny_autoencoder, tmp_path / "run", None)
                 if not o.startswith("tracking.")]
    assert train_main(["--config", str(ROOT / "configs/ldm/emoji.yaml"), *overrides, "train.max_steps=1",
                       "tracking.experiment=env-ldm"]) == 0
    assert ae_main(["--config", str(ROOT / "configs/autoencoder/emoji.yaml"), f"data.train={tiny_shards}",
                    f"data.val={tiny_shards}", "data.image_size=16", "data.batch_size=4",
                    "model.block_out_channels=[8,16]", "model.norm_num_groups=8", "train.steps=2",
                    "train.scale_batches=1", "eval.rfid=false", f"run.output_dir={tmp_path / 'ae'}",
                    "tracking.experiment=env-ae"]) == 0
    client = MlflowClient(tracking_uri=uri)
    for name in ("env-ldm", "env-ae"):
        experiment = client.get_experiment_by_name(name)
        assert experiment is not None and client.search_runs([experiment.experiment_id]), name
    assert not (tmp_path / "runs" / "mlflow.db").exists()


def test_evaluation_is_built_and_checked_at_start(tmp_path, tiny_shards, tiny_autoencoder, capsys, monkeypatch):
    """A run whose data has no labels for the alignment classifier fails before its first step, with one line."""
    import ldm.train.trainer as trainer_mod
    from ldm.cli.train import main
    from ldm.data.shards import encode_png, write_shards
    from ldm.eval.realset import read_split
    from ldm.pipeline import to_pil

    real = read_split(str(tiny_shards), "train", 16, progress=False)  # the same images, but no labels
    samples = [{"__key__": key, "png": encode_png(im), "txt": caption, "json": json.dumps({"key": key})}
               for key, im, caption in zip(real.keys, to_pil(real.floats()), real.captions)]
    plain = tmp_path / "plain"
    names, counts = write_shards(samples, plain, "train")
    (plain / "index.json").write_text(json.dumps({"splits": {"train": {"shards": names, "counts": counts,
                                                                       "total": sum(counts)}}}))
    steps = []
    monkeypatch.setattr(trainer_mod.Trainer, "micro_step", lambda self, batch: steps.append(1) or 0.0)
    overrides = tiny_ldm_overrides(tiny_shards, tiny_autoencoder, tmp_path / "run", None)
    with pytest.raises(SystemExit) as e:
        main(["--config", str(ROOT / "configs/ldm/emoji.yaml"), *overrides, "eval.every=2", f"eval.data={plain}",
              "eval.num_images=3", "eval.reference_images=3", f"eval.cache_dir={tmp_path / 'cache'}"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "no 'subcategory' labels" in line and "eval.classifier" in line, line
    assert steps == []  # not a single step was trained


def test_skipped_samples_are_summed_over_workers(tmp_path):
    """Each DataLoader worker counts its own skips; a batch says whose count it carries, the trainer sums them."""
    from ldm.data import make_loader
    from ldm.data.shards import write_shards
    from tests.data.test_shards_stream import synthetic_sample

    urls = []
    for shard in range(2):  # one bad sample in each shard: each worker reads one shard and skips one sample
        samples = [synthetic_sample(shard * 10 + i) for i in range(8)]
        samples[3]["png"] = b"\x89PNG\r\n\x1a\n not an image"
        names, _ = write_shards(samples, tmp_path / f"s{shard}", "train")
        urls.append(str(tmp_path / f"s{shard}" / names[0]))
    latest: dict[int, int] = {}
    for batch in make_loader(urls, batch_size=2, image_size=8, num_workers=2, shuffle_buffer=0):
        latest[batch["worker"]] = batch["skipped"]
    assert latest == {0: 1, 1: 1}  # each worker's own running count (the trainer's sum: the test below)


def _two_shards_with_a_bad_image_each(shards, out) -> None:
    """The first two train shards of ``shards`` with the second image of each replaced by bytes that are no image."""
    import io
    import tarfile

    out.mkdir()
    index = json.loads((shards / "index.json").read_text())
    train = index["splits"]["train"]
    index["splits"] = {"train": {"shards": train["shards"][:2], "counts": train["counts"][:2],
                                 "total": sum(train["counts"][:2])}}
    (out / "index.json").write_text(json.dumps(index))
    for name in train["shards"][:2]:
        with tarfile.open(shards / name) as src:
            members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
        pngs = [m.name for m, _ in members if m.name.endswith(".png")]
        with tarfile.open(out / name, "w") as dst:
            for member, data in members:
                if member.name == pngs[1]:
                    data = b"\x89PNG\r\n\x1a\n not an image"
                    member.size = len(data)
                dst.addfile(member, io.BytesIO(data))


def test_trainer_logs_the_skips_of_every_worker(tmp_path, tiny_shards, tiny_autoencoder):
    """Two loader workers each skip the bad image of their shard: the trainer's train/skipped_samples, read back from
    MLflow, counts both (the sum over workers of each one's latest count)."""
    from mlflow.tracking import MlflowClient

    import ldm.train.trainer as trainer_mod
    from ldm.config import LDMConfig, load_config

    shards = tmp_path / "shards"
    _two_shards_with_a_bad_image_each(tiny_shards, shards)  # one shard per worker
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml",
                      [*tiny_ldm_overrides(tiny_shards, tiny_autoencoder, tmp_path / "run", uri), f"data.train={shards}",
                       "data.num_workers=2", "data.shuffle_buffer=0", "data.batch_size=2", "train.max_steps=3",
                       "train.ckpt_every=3", "sampling.prompts=[x]", "tracking.experiment=skips"])
    tr = trainer_mod.Trainer(cfg)
    result = tr.train()
    assert tr.skipped == {0: 1, 1: 1}
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(result["run_id"], "train/skipped_samples")
    assert [m.step for m in history] == [1, 2, 3]
    # the first batch of worker 0 already passed its bad image; worker 1's first batch (step 2) adds its own
    assert [m.value for m in history] == [1.0, 2.0, 2.0]


def test_the_finiteness_check_is_one_fused_reduction(monkeypatch):
    from ldm.models import UNet, unet_preset
    from ldm.train.engine import weights_finite

    unet = UNet(**unet_preset("tiny"), in_channels=4, out_channels=4)
    syncs = []
    real_bool = torch.Tensor.__bool__

    def counting_bool(self):
        syncs.append(1)
        return real_bool(self)

    monkeypatch.setattr(torch.Tensor, "__bool__", counting_bool)
    assert weights_finite(unet)
    with torch.no_grad():
        next(unet.parameters())[0] = float("nan")
    assert not weights_finite(unet)
    monkeypatch.undo()
    n_params = sum(1 for _ in unet.parameters())
    assert n_params > 50 and len(syncs) == 2  # one host sync per check, not one per parameter
