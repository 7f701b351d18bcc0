"""The sampling script on a model served by a real `mlflow server`: runs:/ and models:/ URIs, PNG metadata,
per-image seeds (the same seed gives the identical image twice), clear errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import ROOT, tiny_ldm_overrides


def _env(cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "LDM_CACHE": str(cwd / "cache")}  # where downloaded models go


def _sample(args, cwd):
    """Run the installed console script, as a user would."""
    script = Path(sys.executable).parent / "ldm-sample"
    return subprocess.run([str(script), *args], capture_output=True, text=True, env=_env(cwd), cwd=cwd)


def test_sample_from_mlflow_server(tmp_path, tiny_shards, tiny_autoencoder, mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    from ldm.cli.train import main as train_main

    out = tmp_path / "run"
    assert train_main(["--config", str(ROOT / "configs/ldm/emoji.yaml"),
                       *tiny_ldm_overrides(tiny_shards, tiny_autoencoder, out, mlflow_server),
                       "run.name=served-ldm", "train.max_steps=2", "tracking.experiment=served"]) == 0
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.search_runs([client.get_experiment_by_name("served").experiment_id])[0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]

    common = ["--tracking-uri", mlflow_server, "--prompt", "red apple", "--steps", "3", "--guidance", "2.5",
              "--sampler", "ddim", "--images-per-prompt", "2", "--seed", "11"]
    first = _sample(["--model", f"runs:/{run.info.run_id}/export", *common, "--out", str(tmp_path / "a")], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    second = _sample(["--model", "models:/served-ldm/1", *common, "--out", str(tmp_path / "b")], tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    for name in ("00000.png", "00001.png"):
        a, b = Image.open(tmp_path / "a" / name), Image.open(tmp_path / "b" / name)
        assert np.array_equal(np.asarray(a), np.asarray(b))  # same model, same seed: the identical image
    meta = json.loads(Image.open(tmp_path / "a" / "00001.png").text["parameters"])
    assert meta == {"prompt": "red apple", "negative_prompt": "", "seed": 12, "sampler": "ddim", "steps": 3,
                    "guidance": 2.5, "guidance_rescale": 0.0, "guidance_interval": None, "time_shift": 1.0,
                    "spacing": None, "model": f"runs:/{run.info.run_id}/export", "weights": "ema", "height": 16,
                    "width": 16}
    # image 1 regenerated alone with its own seed is the same image
    alone = _sample(["--model", str(out / "export"), "--prompt", "red apple", "--steps", "3", "--guidance", "2.5",
                     "--sampler", "ddim", "--images-per-prompt", "1", "--seed", "12", "--out", str(tmp_path / "c")],
                    tmp_path)
    assert alone.returncode == 0, alone.stderr[-2000:]
    np.testing.assert_allclose(np.asarray(Image.open(tmp_path / "c" / "00000.png"), dtype=float),
                               np.asarray(Image.open(tmp_path / "a" / "00001.png"), dtype=float), atol=1)

    # the downloads went to $LDM_CACHE/mlflow, one folder per URI; a pinned URI is not fetched again, and one that
    # can move (latest) is fetched again into its one folder
    from ldm.tracking import download_artifacts

    cached = sorted((tmp_path / "cache" / "mlflow").iterdir())
    assert [p.name.split("-")[0] for p in cached] == ["models", "runs"]
    monkeypatch.setenv("LDM_CACHE", str(tmp_path / "cache"))
    pinned = download_artifacts("models:/served-ldm/1", mlflow_server)
    assert pinned.parent == cached[0] and pinned.stat().st_ino == (cached[0] / "artifacts").stat().st_ino
    latest = download_artifacts("models:/served-ldm/latest", mlflow_server)
    inode = latest.stat().st_ino
    assert download_artifacts("models:/served-ldm/latest", mlflow_server) == latest
    assert (latest / "config.yaml").is_file() and latest.stat().st_ino != inode
    assert len(list((tmp_path / "cache" / "mlflow").iterdir())) == 3
    import mlflow  # and this process's MLflow URIs are as they were (a later test's sqlite store stays its own)

    assert mlflow.get_registry_uri() != mlflow_server and mlflow.get_tracking_uri() != mlflow_server

    missing = _sample(["--model", "models:/no-such-model/7", "--tracking-uri", mlflow_server, "--prompt", "x"], tmp_path)
    assert missing.returncode == 2 and "models:/no-such-model/7" in missing.stderr
    bad_spacing = _sample(["--model", str(out / "export"), "--prompt", "x", "--spacing", "sideways"], tmp_path)
    assert bad_spacing.returncode == 2
