"""DeepSpeed with two processes (gloo) through the local launcher: ranks agree on the weights; ZeRO-3 partitions
consolidate exactly; kill -9 mid-epoch and resume reproduces the uninterrupted run bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, tiny_ldm_overrides

# 6 optimizer steps of 2 micro-batches (3 samples each) per rank; a data epoch is 5 micro-batches, so the
# checkpoint at step 3 (6 micro-batches) sits one batch into epoch 1: resume must continue mid-epoch
RUN = ("train.max_steps=6", "train.ckpt_every=3", "train.grad_accum=2", "data.batch_size=3",
       "data.batches_per_epoch=5", "train.log_every=100", "sampling.steps=2")


def launch(out, shards, autoencoder, *extra) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHON"] = sys.executable
    cmd = ["bash", str(ROOT / "launch/local.sh"), "-n", "2", "--config", str(ROOT / "configs/ldm/emoji.yaml"),
           *tiny_ldm_overrides(shards, autoencoder, out, None), *RUN, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)


def run_to_end(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    return out


def assert_same_weights(a_dir, b_dir) -> None:
    for name in ("unet.safetensors", "unet_ema.safetensors"):
        a, b = load_file(str(a_dir / name)), load_file(str(b_dir / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, tiny_shards, tiny_autoencoder):
    out = tmp_path_factory.mktemp("zero2") / "run"
    run_to_end(launch(out, tiny_shards, tiny_autoencoder, "train.zero_stage=2"))
    return out


@pytest.mark.distributed
def test_zero2_ranks_agree(zero2_run):
    folder = zero2_run / "checkpoints" / "step00000006"
    states = [torch.load(folder / f"trainer_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert states[0]["param_digest"] is not None and states[0]["param_digest"] == states[1]["param_digest"]
    assert states[0]["samples_seen"] == 6 * 2 * 2 * 3  # steps x ranks x accumulation x micro-batch
    assert not torch.equal(states[0]["generator"], states[1]["generator"])  # per-rank noise streams
    ema, raw = load_file(str(zero2_run / "export" / "unet_ema.safetensors")), load_file(str(zero2_run / "export" / "unet.safetensors"))
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)  # the EMA is its own set of weights


@pytest.mark.distributed
def test_kill9_mid_epoch_and_resume_matches_uninterrupted(tmp_path, zero2_run, tiny_shards, tiny_autoencoder):
    run = tmp_path / "killed"
    proc = launch(run, tiny_shards, tiny_autoencoder, "train.zero_stage=2")
    deadline = time.time() + 600
    while not (run / "checkpoints" / "latest").exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 the launcher and both ranks
    proc.wait()
    assert not (run / "export").exists()
    state = torch.load(run / "checkpoints" / "step00000003" / "trainer_rank0.pt", weights_only=False)
    assert (state["epoch"], state["epoch_batches"]) == (1, 1)
    out = run_to_end(launch(run, tiny_shards, tiny_autoencoder, "train.zero_stage=2"))
    assert "resumed from" in out
    assert_same_weights(zero2_run / "export", run / "export")


@pytest.mark.distributed
def test_zero3_partitions_consolidate(tmp_path, tiny_shards, tiny_autoencoder):
    """ldm-export rebuilds, from the ZeRO-3 checkpoint files, exactly what the trainer gathered for its export."""
    from ldm.cli.export import main as export_main

    out = tmp_path / "run"
    run_to_end(launch(out, tiny_shards, tiny_autoencoder, "train.zero_stage=3"))
    assert export_main([str(out), "--out", str(tmp_path / "reexport")]) == 0
    assert_same_weights(out / "export", tmp_path / "reexport")


def test_launcher_dry_run_prints_command():
    proc = subprocess.run(["bash", str(ROOT / "launch/local.sh"), "-n", "2", "--dry-run", "train.max_steps=5"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0
    assert "ldm.cli.train" in proc.stdout and "train.max_steps=5" in proc.stdout
    bad = subprocess.run(["bash", str(ROOT / "launch/local.sh"), "-n", "zero"], capture_output=True, text=True)
    assert bad.returncode == 2 and "nproc" in bad.stderr
