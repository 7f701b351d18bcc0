"""The patch-adversarial term of the first stage: the hinge loss and the adaptive weight against their formulas, the
patch discriminator's output grid, and a training run in which the discriminator learns and switches on when told."""

from __future__ import annotations

import pytest
import torch

from autoencoder import train_autoencoder
from autoencoder.adversarial import PatchDiscriminator, adaptive_weight, generator_loss, hinge_d_loss
from tests.autoencoder.test_io_train import squares, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_hinge_losses_match_their_formulas():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - x): 0, 0.5, 2
    fake = torch.tensor([-2.0, 0.0, 1.5])  # relu(1 + x): 0, 1, 2.5
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3.5 / 3))
    assert generator_loss(fake).item() == pytest.approx(0.5 / 3)  # -mean(-2, 0, 1.5)


def test_adaptive_weight_is_the_ratio_of_last_layer_gradient_norms():
    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 3)
    y = x @ w.T  # (5, 4)
    rec, g = y.pow(2).sum(), -3.0 * y.sum()
    # d rec / dw = 2 y^T x; d g / dw = -3 * 1^T x (the same row for every output)
    expected = (2 * y.T @ x).norm() / ((-3.0 * torch.ones(5, 4)).T @ x).norm()
    got = adaptive_weight(rec, g, w, delta=0.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not got.requires_grad
    rec.backward()  # the graph was kept for the real backward pass
    assert w.grad is not None


def test_discriminator_scores_patches():
    d = PatchDiscriminator(layers=2)
    assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 6, 6)  # 32 -> 16 -> 8 -> 7 -> 6
    with pytest.raises(ValueError, match="layers"):
        PatchDiscriminator(layers=0)


def test_discriminator_switches_on_at_disc_start_and_learns():
    data = squares(16)

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            yield data[torch.randint(0, len(data), (8,), generator=g)]  # (8, 3, 16, 16)

    logs: dict[int, dict] = {}
    train_autoencoder(tiny_model(), batches(), steps=60, lr=2e-3, log_every=10, disc_weight=0.5, disc_start=20,
                      progress=False, on_log=lambda step, parts: logs.__setitem__(step, parts))
    assert all("d_loss" not in logs[s] for s in (10, 20))  # reconstruction alone before disc_start
    assert all({"d_loss", "g_loss", "disc_lambda"} <= set(logs[s]) for s in (30, 40, 50, 60))
    assert logs[60]["d_loss"] < logs[30]["d_loss"]  # it learns to tell real squares from reconstructions
    assert all(0 < logs[s]["disc_lambda"] <= 0.5 * 1e4 for s in (30, 60))
    with pytest.raises(ValueError, match="disc_weight"):
        train_autoencoder(tiny_model(), batches(), steps=1, disc_weight=-1.0, progress=False)


def test_the_stage1_config_turns_the_adversarial_term_on(tmp_path, tiny_shards):
    """train.disc_weight / disc_start / disc_layers reach the training loop through ldm-train-autoencoder (the
    discriminator's losses are logged to MLflow from disc_start on); a bad value exits 2 before training."""
    from mlflow.tracking import MlflowClient

    from ldm.cli.train_autoencoder import main
    from tests.conftest import ROOT

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--config", str(ROOT / "configs/autoencoder/emoji.yaml"), f"data.train={tiny_shards}",
            f"data.val={tiny_shards}", "data.image_size=16", "data.batch_size=4", "model.block_out_channels=[8,16]",
            "model.norm_num_groups=8", "model.latent_channels=4", "train.steps=4", "train.scale_batches=1",
            "train.log_every=1", "eval.rfid=false", f"run.output_dir={tmp_path / 'ae'}", f"tracking.uri={uri}"]
    assert main([*args, "train.disc_weight=0.5", "train.disc_start=2", "train.disc_layers=1"]) == 0
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("emoji-autoencoder").experiment_id])[0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "autoencoder/d_loss")] == [3, 4]
    assert run.data.params["train.disc_weight"] == "0.5"
    with pytest.raises(SystemExit) as e:
        main([*args, "train.disc_layers=0", f"run.output_dir={tmp_path / 'bad'}"])
    assert e.value.code == 2 and not (tmp_path / "bad").exists()
