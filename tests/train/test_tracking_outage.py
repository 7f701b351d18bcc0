"""The MLflow server going away mid-run does not stop training: it warns once, keeps the metrics, goes on, and once the
server is back the queued metrics arrive."""

from __future__ import annotations

import logging
from urllib.parse import urlparse

import ldm.tracking.tracker as tracker_mod
import ldm.train.trainer as trainer_mod
from ldm.config import LDMConfig, load_config
from tests.conftest import ROOT, start_mlflow_server, stop_mlflow_server, tiny_ldm_overrides


def test_server_killed_mid_run(tmp_path, tiny_shards, tiny_autoencoder, monkeypatch, caplog):
    """Steps 1-2 are logged, the server dies before step 3 and comes back (same store, same address) before step 5:
    the history holds every step 1-5 once, and the run ends FINISHED."""
    from mlflow.tracking import MlflowClient

    base = tmp_path / "server"
    base.mkdir()
    proc, uri = start_mlflow_server(base)
    monkeypatch.setattr(tracker_mod, "RETRY_SECONDS", 0.5)  # retry soon after a failure (default 30 s)
    cfg = load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml",
                      [*tiny_ldm_overrides(tiny_shards, tiny_autoencoder, tmp_path / "run", uri), "train.max_steps=5",
                       "train.ckpt_every=5", "run.name=outage"])
    tr = trainer_mod.Trainer(cfg)
    real_step, calls, queued = tr.micro_step, [], []

    def micro_step(batch):
        nonlocal proc
        calls.append(1)
        if len(calls) == 3:  # after steps 1 and 2 were logged
            stop_mlflow_server(proc)
        if len(calls) == 5:  # steps 3-4 could not be logged: the server comes back
            queued.append(len(tr.tracker._pending))
            proc, _ = start_mlflow_server(base, urlparse(uri).port)
        return real_step(batch)

    monkeypatch.setattr(tr, "micro_step", micro_step)
    try:
        with caplog.at_level(logging.WARNING, logger="ldm.tracking.tracker"):
            result = tr.train()
        assert result["step"] == 5 and result["export"] is not None
        messages = [r.getMessage() for r in caplog.records]
        assert any("training continues" in m for m in messages) and "MLflow tracking is back" in messages
        assert queued and queued[0] >= 1  # steps 3 (and 4) waited in the queue while the server was down
        client = MlflowClient(tracking_uri=uri)
        run = client.get_run(result["run_id"])
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(result["run_id"], "train/loss")] == [1, 2, 3, 4, 5]
    finally:
        stop_mlflow_server(proc)
