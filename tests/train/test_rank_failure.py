"""No rank hangs another: when rank 0 raises in work only it does (here the sample grid), every rank learns it at
the next collective instead of waiting at a barrier, saves the steps since the last checkpoint, and exits non-zero."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, tiny_ldm_overrides


@pytest.mark.distributed
def test_rank0_failure_in_validation_stops_both_ranks(tmp_path, tiny_shards, tiny_autoencoder):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.train.failing_worker", *tiny_ldm_overrides(tiny_shards, tiny_autoencoder, out, None),
           "train.max_steps=6", "train.sample_every=3", "train.ckpt_every=5", "data.batch_size=2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    lines, failed_at, deadline = [], None, time.time() + 600
    try:
        for line in proc.stdout:  # until both ranks (and torchrun) have exited
            lines.append(line)
            if failed_at is None and "validation broke on rank 0" in line:
                failed_at = time.time()
            assert time.time() < deadline, "".join(lines[-50:])
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    log = "".join(lines)
    assert failed_at is not None, log[-3000:]
    assert time.time() - failed_at < 60, "a rank waited for rank 0 after it failed"
    assert proc.returncode != 0, log[-3000:]
    assert "validation broke on rank 0 at step 3" in log
    assert "rank 0 failed during the sample grid of step 3" in log, log[-3000:]  # rank 1's own error
    # both ranks saved step 3 (not a checkpoint step) before leaving: nothing trained was lost
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000003"
    assert {p.name for p in (out / "checkpoints" / "step00000003").glob("ema_rank*")} == {"ema_rank0.safetensors",
                                                                                           "ema_rank1.safetensors"}
