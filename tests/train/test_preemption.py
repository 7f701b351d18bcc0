"""SIGUSR1 (SLURM's pre-emption warning) to a training process: checkpoint, requeue command, clean exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch

from tests.conftest import ROOT, tiny_ldm_overrides


def test_sigusr1_checkpoints_and_requeues(tmp_path, tiny_shards, tiny_autoencoder):
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
        proc.send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert "pre-empted" in output
    assert marker.read_text().strip() == "requeue"
    tag = (out / "checkpoints" / "latest").read_text().strip()
    state = torch.load(out / "checkpoints" / tag / "trainer_rank0.pt", weights_only=False)
    assert state["step"] >= 1 and tag == f"step{state['step']:08d}"
    assert not (out / "export").exists()  # a pre-empted run does not export
