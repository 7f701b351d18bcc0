"""DeepSpeed with two processes (gloo) through the local launcher: both ranks train and agree on the weights."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, tiny_ldm_overrides


@pytest.mark.distributed
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_processes_agree(tmp_path, tiny_shards, tiny_autoencoder, zero_stage):
    """ZeRO-2: replicated weights must be bitwise equal on both ranks. ZeRO-3: partitions are consolidated
    (checkpoint -> ldm-export) into exactly the weights the trainer gathered for its own export."""
    from safetensors.torch import load_file

    from ldm.cli.export import main as export_main

    out = tmp_path / "ldm2"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHON"] = sys.executable
    cmd = ["bash", str(ROOT / "launch/local.sh"), "-n", "2", "--config", str(ROOT / "configs/ldm/emoji.yaml"),
           *tiny_ldm_overrides(tiny_shards, tiny_autoencoder, out, None),
           "train.max_steps=3", "train.ckpt_every=3", f"train.zero_stage={zero_stage}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = out / "checkpoints" / "step00000003"
    states = [torch.load(folder / f"trainer_rank{r}.pt", weights_only=False) for r in (0, 1)]
    if zero_stage < 3:
        assert states[0]["param_digest"] is not None
        assert states[0]["param_digest"] == states[1]["param_digest"]
    # the global batch counts both ranks: 3 steps x 2 ranks x micro-batch 4
    assert states[0]["samples_seen"] == 3 * 2 * 4
    # the ranks drew different diffusion noise (per-rank generators), i.e. they did not duplicate work
    assert not torch.equal(states[0]["generator"], states[1]["generator"])
    assert export_main([str(out), "--out", str(tmp_path / "reexport")]) == 0
    for name in ("unet.safetensors", "unet_ema.safetensors"):
        trained, exported = load_file(str(out / "export" / name)), load_file(str(tmp_path / "reexport" / name))
        assert trained.keys() == exported.keys()
        for key in trained:
            assert torch.equal(trained[key], exported[key]), (name, key)
    ema, raw = load_file(str(out / "export" / "unet_ema.safetensors")), load_file(str(out / "export" / "unet.safetensors"))
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)  # the EMA is its own set of weights


def test_launcher_dry_run_prints_command():
    proc = subprocess.run(["bash", str(ROOT / "launch/local.sh"), "-n", "2", "--dry-run", "train.max_steps=5"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0
    assert "--nproc_per_node 2" in proc.stdout and "ldm.cli.train" in proc.stdout and "train.max_steps=5" in proc.stdout
    bad = subprocess.run(["bash", str(ROOT / "launch/local.sh"), "-n", "zero"], capture_output=True, text=True)
    assert bad.returncode == 2 and "nproc" in bad.stderr
