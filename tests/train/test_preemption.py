"""Stop signals to a real training process: SIGUSR1 (SLURM's pre-emption warning) checkpoints, runs the requeue
command and exits 0; SIGTERM (scancel, docker stop) checkpoints and exits 143 without requeueing. Either way the
checkpoint is complete and loadable, and a pre-empted run does not export."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT, tiny_ldm_overrides


@pytest.mark.parametrize("sig, code, requeued", [(signal.SIGUSR1, 0, True), (signal.SIGTERM, 143, False)],
                         ids=["SIGUSR1", "SIGTERM"])
def test_signal_checkpoints_and_exits(tmp_path, tiny_shards, tiny_autoencoder, sig, code, requeued):
    from ldm.train.checkpoint import read_weights

    out = tmp_path / "ldm"
    marker = tmp_path / "requeued"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["LDM_REQUEUE_CMD"] = f"echo requeue > {marker}"
    cmd = [sys.executable, "-m", "ldm.cli.train", "--config", str(ROOT / "configs/ldm/emoji.yaml"),
           *tiny_ldm_overrides(tiny_shards, tiny_autoencoder, out, None), "train.max_steps=100000",
           "train.ckpt_every=100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.time() + 300
        while not (out / "config.yaml").exists():  # written when the loop starts
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "training did not start"
            time.sleep(0.5)
        time.sleep(3)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, output[-3000:]
    assert "pre-empted" in output
    assert marker.exists() == requeued
    tag = (out / "checkpoints" / "latest").read_text().strip()
    state = torch.load(out / "checkpoints" / tag / "trainer_rank0.pt", weights_only=False)
    assert state["step"] >= 1 and tag == f"step{state['step']:08d}"
    assert f"checkpointed {state['step']}" in output
    raw, ema, _ = read_weights(out / "checkpoints")  # loadable: the full weights and EMA of the checkpoint
    assert raw.keys() == ema.keys() and all(torch.isfinite(t).all() for t in [*raw.values(), *ema.values()])
    assert not (out / "export").exists()  # a pre-empted run does not export
