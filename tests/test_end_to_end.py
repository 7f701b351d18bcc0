"""The whole pipeline on real emoji, tiny: shards -> autoencoder -> LDM under DeepSpeed -> checkpoint ->
CFG sampling through the CLI -> images on disk; the MLflow run holds params, metric history and images."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from PIL import Image

from tests.conftest import ROOT, resumed_line, tiny_ldm_overrides


def test_pipeline_end_to_end(tmp_path, tiny_shards, tiny_autoencoder):
    from mlflow.tracking import MlflowClient

    from ldm.cli.train import main as train_main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "ldm"
    rc = train_main(["--config", str(ROOT / "configs/ldm/emoji.yaml"),
                     *tiny_ldm_overrides(tiny_shards, tiny_autoencoder, out, uri, recipe="default")])  # as shipped
    assert rc == 0

    # checkpoint: the latest pointer names a complete checkpoint; keep_last=2 kept steps 2 and 4
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step00000004"
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step00000002", "step00000004"]
    assert (ckpts / "step00000004" / "ema_rank0.safetensors").exists()
    # the export's diffusers folders load in diffusers and compute what our models compute
    import torch
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from ldm.models import UNet

    theirs = UNet2DConditionModel.from_pretrained(out / "export" / "diffusers" / "unet").eval()
    ours = UNet.from_diffusers_config(dict(theirs.config)).eval()
    ours.load_state_dict(load_file(str(out / "export" / "unet_ema.safetensors")))
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 8, theirs.config.cross_attention_dim)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, torch.tensor([3.0, 700.0]), ctx),
                                   theirs(x, torch.tensor([3.0, 700.0]), ctx).sample, rtol=1e-5, atol=1e-5)
    assert DiffusersVAE.from_pretrained(out / "export" / "diffusers" / "vae").config.latent_channels == 4
    grid = Image.open(out / "samples" / "grid_step0000004.png")
    assert grid.size[0] > 16 and grid.size[1] > 16

    # sampling script on the exported model: CFG, two images per prompt, right size, metadata
    samples = tmp_path / "samples"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "ldm.cli.sample", "--model", str(out / "export"),
                           "--prompt", "red apple", "--prompt", "dog face", "--guidance", "3", "--steps", "4",
                           "--sampler", "flow_sde", "--images-per-prompt", "2", "--seed", "5",
                           "--out", str(samples)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = sorted(p.name for p in samples.glob("0*.png"))
    assert files == ["00000.png", "00001.png", "00002.png", "00003.png"]
    image = Image.open(samples / "00003.png")
    assert image.size == (16, 16) and image.mode == "RGB"
    meta = json.loads(image.text["parameters"])
    assert meta["prompt"] == "dog face" and meta["seed"] == 8 and meta["guidance"] == 3.0
    assert (samples / "grid.png").exists()

    # a training run folder works too (its latest checkpoint is exported first) and gives the same images
    import shutil

    shutil.rmtree(out / "export")
    again = subprocess.run([sys.executable, "-m", "ldm.cli.sample", "--model", str(out), "--prompt", "red apple",
                            "--prompt", "dog face", "--guidance", "3", "--steps", "4", "--sampler", "flow_sde",
                            "--images-per-prompt", "2", "--seed", "5", "--out", str(tmp_path / "again")],
                           capture_output=True, text=True, env=env, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    assert Image.open(tmp_path / "again" / "00003.png").tobytes() == image.tobytes()

    # MLflow: params, a metric history, an image artifact
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("emoji-ldm").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "4" and run.data.params["model.preset"] == "tiny"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert any(p.endswith(".png") for p in artifacts), artifacts
    assert any(a.path == "export" for a in client.list_artifacts(run.info.run_id))
    versions = client.search_model_versions("name='emoji-ldm'")
    assert [v.run_id for v in versions] == [run.info.run_id] and versions[0].source.endswith("/export")


def test_resume_continues_from_latest(tmp_path, tiny_shards, tiny_autoencoder, trained_steps, capsys):
    """A finished run re-started with more steps resumes at its last checkpoint instead of starting over (ZeRO-0, one
    process: the default): it says so, trains only steps 3-4, and continues the same MLflow run's history."""
    from mlflow.tracking import MlflowClient

    from ldm.cli.train import main as train_main

    out = tmp_path / "ldm"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--config", str(ROOT / "configs/ldm/emoji.yaml"), *tiny_ldm_overrides(tiny_shards, tiny_autoencoder, out, uri)]
    assert train_main(args + ["train.max_steps=2", "train.sample_every=0"]) == 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000002"
    assert trained_steps == [1, 2] and "resumed from" not in capsys.readouterr().out
    trained_steps.clear()
    assert train_main(args + ["train.max_steps=4"]) == 0
    assert resumed_line(out / "checkpoints", 2) in capsys.readouterr().out
    assert trained_steps == [3, 4]  # only the remaining steps
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000004"
    import torch

    state = torch.load(out / "checkpoints" / "step00000004" / "trainer_rank0.pt", weights_only=False)
    assert state["step"] == 4 and state["samples_seen"] == 4 * 4
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("emoji-ldm").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the resumed run logs into the run it continues
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] == [1, 2, 3, 4]
    # MLflow refuses to change a param: the new train.max_steps is a tag beside the first run's value
    assert runs[0].data.params["train.max_steps"] == "2" and runs[0].data.tags["changed.train.max_steps"] == "2 -> 4"
