"""launch/slurm.sbatch on a real SLURM cluster of two hosts (tests/launch/cluster.py): a job trains to the same
weights as ldm-train, is pre-empted (SIGUSR1 to the batch shell, as --signal=B:USR1@N does), requeues itself, is
restarted by SLURM and resumes to the same weights bit for bit; scancel (SIGTERM) checkpoints and stays cancelled."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.launch.cluster import (STEPS, bitwise_equal, cluster_args, export_weights, latest_tag, train_env,
                                  wait_for)

pytestmark = pytest.mark.cluster
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def submit(slurm, folder: Path, args: list[str]) -> tuple[str, Path]:
    """sbatch launch/slurm.sbatch on both nodes from `folder`; returns the job id and its output file."""
    proc = slurm.run(["sbatch", "--parsable", "--nodes", "2", "--output", str(folder / "slurm-%j.out"),
                      str(ROOT / "launch/slurm.sbatch"), *args], env=train_env(), cwd=folder)
    job = proc.stdout.strip().split(";")[0]
    assert job.isdigit(), proc.stdout + proc.stderr
    return job, folder / f"slurm-{job}.out"


def test_sbatch_trains_like_ldm_train(slurm, reference, tmp_path, tiny_shards, tiny_autoencoder):
    out = tmp_path / "run"
    job, log = submit(slurm, tmp_path, cluster_args(tiny_shards, tiny_autoencoder, out))
    info = slurm.wait_job(job, FINAL, timeout=900)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    assert "2 nodes x 1 processes = world size 2" in text
    assert info["NodeList"] == "ldmnode[0-1]"
    for node in (0, 1):  # each node's own name (before: the submitting host's $HOSTNAME, passed on by srun)
        assert f"[launch] node {node}/2 on ldmnode{node}:" in text, text[-3000:]
    assert bitwise_equal(export_weights(out), export_weights(reference)) == []


def test_preempted_job_requeues_and_resumes_bit_for_bit(slurm, reference, tmp_path, tiny_shards, tiny_autoencoder):
    out = tmp_path / "run"
    job, log = submit(slurm, tmp_path, cluster_args(tiny_shards, tiny_autoencoder, out))
    wait_for(lambda: (out / "checkpoints" / "latest").exists(), 600, "the first checkpoint")
    # what --signal=B:USR1@N does at the time limit, without waiting for it
    slurm.run(["scancel", "--signal=USR1", "--batch", job])
    info = slurm.wait_job(job, FINAL, timeout=900)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-3000:]
    assert "(restart 0)" in text and "(restart 1)" in text
    assert "requeue command failed" not in text  # SLURM's SIGTERM to the job reached `scontrol requeue` too
    stopped = int(re.search(r"pre-emption warning signal: checkpointed (\d+)", text).group(1))
    assert 2 <= stopped < STEPS
    assert f"resumed from {out / 'checkpoints' / f'step{stopped:08d}'} at step {stopped}" in text
    assert latest_tag(out) == f"step{STEPS:08d}"
    assert bitwise_equal(export_weights(out), export_weights(reference)) == []


def test_scancel_checkpoints_and_stays_cancelled(slurm, tmp_path, tiny_shards, tiny_autoencoder):
    """scancel: SLURM sends SIGTERM to every process of the job (KillWait=30 s before SIGKILL). The ranks agree to
    stop, checkpoint and exit 143; no requeue, and the launchers say it was a stop (exit 143, not torchrun's 1)."""
    out = tmp_path / "run"
    job, log = submit(slurm, tmp_path, cluster_args(tiny_shards, tiny_autoencoder, out, "train.max_steps=100000"))
    wait_for(lambda: (out / "checkpoints" / "latest").exists(), 600, "the first checkpoint")
    cancelled = time.time()
    slurm.run(["scancel", job])
    info = slurm.wait_job(job, FINAL, timeout=120)
    ended = time.time() - cancelled
    time.sleep(15)  # longer than a requeued job waits to start again here (cred_expire=5, sched_interval=2)
    info, text = slurm.job(job), log.read_text()
    print(f"scancel: job {info['JobState']} {ended:.1f} s later, ExitCode {info['ExitCode']}")
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", text[-3000:]
    assert "(restart 1)" not in text and "requeueing:" not in text, text[-3000:]
    stopped = int(re.search(r"stop signal: checkpointed (\d+)", text).group(1))
    assert latest_tag(out) == f"step{stopped:08d}"
    assert "[launch] stopped by SIGTERM: exit 143" in text, text[-3000:]
