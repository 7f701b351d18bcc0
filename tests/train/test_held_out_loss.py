"""The held-out loss: fixed times and fixed noise per sample, so it is the same on every run and every world size
(1 process or 2 under ZeRO-2), falls as the model trains, and is logged per timestep band."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, tiny_ldm_overrides


def held_out(nproc: int, overrides: list[str]) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), "-m", "tests.train.held_out_worker", *overrides],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("HELD_OUT "))
    return json.loads(line[len("HELD_OUT "):])


@pytest.mark.distributed
def test_held_out_loss_is_the_same_on_every_run_and_world_size(tmp_path, tiny_shards, tiny_autoencoder):
    overrides = [*tiny_ldm_overrides(tiny_shards, tiny_autoencoder, tmp_path / "run", None), "train.val_every=1",
                 "train.val_bands=4", "data.batch_size=2", "train.zero_stage=2"]
    one = held_out(1, overrides)
    again = held_out(1, overrides)
    two = held_out(2, overrides)
    # the chain's knots at the centres of four equal bands of t: timesteps 125, 375, 625, 875 of 1000
    bands = [f"val/loss_t{t:.3f}" for t in (0.126, 0.376, 0.626, 0.876)]
    assert set(one) == {"val/loss", *bands}, sorted(one)
    assert one == again  # bit for bit: the same samples, times and noise
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key  # summed in another order
    assert one["val/loss"] == pytest.approx(sum(one[b] for b in bands) / 4)
    assert one[bands[0]] > one[bands[-1]]  # eps is hardest to tell at low noise


def test_held_out_loss_falls_with_training_and_is_logged(tmp_path, tiny_shards, tiny_autoencoder):
    from mlflow.tracking import MlflowClient

    from ldm.config import LDMConfig, load_config
    from ldm.train import Trainer

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml",
                      [*tiny_ldm_overrides(tiny_shards, tiny_autoencoder, tmp_path / "run", uri), "train.max_steps=30",
                       "train.val_every=10", "train.val_bands=4", "train.lr=3e-3", "train.ckpt_every=30",
                       "tracking.experiment=held-out"])
    trainer = Trainer(cfg)
    before = trainer.held_out(trainer.engine)["val/loss"]
    result = trainer.train()
    assert result["val"]["val/loss"] < before, (before, result["val"])
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(result["run_id"], "val/loss")
    assert [m.step for m in history] == [10, 20, 30]
    assert history[-1].value == pytest.approx(result["val"]["val/loss"])
    assert len(client.get_metric_history(result["run_id"], "val/loss_t0.126")) == 3
