"""The MLflow server going away mid-run does not stop training: it warns once, keeps metrics, goes on."""

from __future__ import annotations

import logging

import ldm.train.trainer as trainer_mod
from ldm.config import LDMConfig, load_config
from tests.conftest import ROOT, start_mlflow_server, stop_mlflow_server, tiny_ldm_overrides


def test_server_killed_mid_run(tmp_path, tiny_shards, tiny_autoencoder, monkeypatch, caplog):
    from mlflow.tracking import MlflowClient

    base = tmp_path / "server"
    base.mkdir()
    proc, uri = start_mlflow_server(base)
    cfg = load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml",
                      [*tiny_ldm_overrides(tiny_shards, tiny_autoencoder, tmp_path / "run", uri), "train.max_steps=5",
                       "train.ckpt_every=5", "run.name=outage"])
    tr = trainer_mod.Trainer(cfg)
    real_step, calls = tr.micro_step, []

    def micro_step(batch):
        calls.append(1)
        if len(calls) == 3:  # after steps 1 and 2 were logged
            stop_mlflow_server(proc)
        return real_step(batch)

    monkeypatch.setattr(tr, "micro_step", micro_step)
    with caplog.at_level(logging.WARNING, logger="ldm.tracking.tracker"):
        result = tr.train()
    assert result["step"] == 5 and result["export"] is not None
    assert any("training continues" in r.getMessage() for r in caplog.records)
    assert tr.tracker._pending  # the metrics of steps 3-5 are kept for a retry

    proc2, uri2 = start_mlflow_server(base)  # the same store, served again
    try:
        client = MlflowClient(tracking_uri=uri2)
        history = client.get_metric_history(result["run_id"], "train/loss")
        assert [m.step for m in history][:2] == [1, 2]
    finally:
        stop_mlflow_server(proc2)
