"""launch/torchrun.sh across two hosts (network namespaces ldmnode0/ldmnode1 with their own hostnames and
169.254.25.x addresses): the ranks rendezvous over the link, write their shards, and train to the reference run's
weights bit for bit; a checkpoint of the two hosts resumes on one (another world size) and continues."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from ldm.train.distributed import free_port
from tests.conftest import ROOT
from tests.launch.cluster import (STEPS, Hosts, bitwise_equal, cluster_args, export_weights, kill_pid, latest_tag,
                                  relative_difference, run_processes, train_env, wait_for)

pytestmark = pytest.mark.cluster


def node_log(out: Path, index: int) -> Path:
    """Where node `index` of the run writing to `out` logs: beside that folder (not on its disk)."""
    return out.parent / f"{out.name}.node{index}.log"


def start_node(hosts: Hosts, index: int, port: int, out: Path, args: list[str], *launcher: str, nnodes: str = "2",
               env: dict[str, str] | None = None) -> subprocess.Popen:
    """launch/torchrun.sh on host `index` (rendezvous at host 0), its output appended to node_log(out, index)."""
    log = open(node_log(out, index), "a")
    argv = hosts[index].argv("bash", str(ROOT / "launch/torchrun.sh"), "--nnodes", nnodes, "--node-rank", str(index),
                             "--master-addr", hosts[0].addr, "--master-port", str(port), *launcher, "--", *args)
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env or train_env(), cwd=out.parent,
                            start_new_session=True)


def run_nodes(hosts: Hosts, out: Path, args: list[str], nodes=(0, 1), timeout: float = 900) -> list[str]:
    """Train on the given hosts to the end; every launcher must exit 0. Returns their outputs."""
    port = free_port()
    procs = [start_node(hosts, i, port, out, args, nnodes=str(len(nodes))) for i in nodes]
    try:
        for p in procs:
            p.wait(timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = [node_log(out, i).read_text().split("[launch] node ")[-1] for i in nodes]  # this run's
    for p, text in zip(procs, logs):
        assert p.returncode == 0, text[-4000:]
    return logs


def test_two_hosts_train_then_resume_on_one(hosts, reference, tmp_path, tiny_shards, tiny_autoencoder):
    out = tmp_path / "run"
    logs = run_nodes(hosts, out, cluster_args(tiny_shards, tiny_autoencoder, out))
    assert "rank 0 of 2 (local rank 0 of 1 on ldmnode0), from RANK" in logs[0]
    assert "rank 1 of 2 (local rank 0 of 1 on ldmnode1), from RANK" in logs[1]
    for step in range(2, STEPS + 1, 2):  # every rank wrote its ZeRO shard, EMA and trainer state
        names = {p.name for p in (out / "checkpoints" / f"step{step:08d}").iterdir()}
        for rank in (0, 1):
            assert {f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", f"ema_rank{rank}.safetensors",
                    f"trainer_rank{rank}.pt"} <= names
    assert bitwise_equal(export_weights(out), export_weights(reference)) == []

    # the step-4 checkpoint of the two hosts, continued on one host alone (world size 2 -> 1, re-partitioned)
    alone = tmp_path / "alone"
    (alone / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step00000004", alone / "checkpoints" / "step00000004")
    (alone / "checkpoints" / "latest").write_text("step00000004\n")
    [log] = run_nodes(hosts, alone, cluster_args(tiny_shards, tiny_autoencoder, alone), nodes=(0,))
    assert f"resumed from {alone / 'checkpoints' / 'step00000004'} at step 4" in log
    assert latest_tag(alone) == f"step{STEPS:08d}"
    state = torch.load(alone / "checkpoints" / latest_tag(alone) / "trainer_rank0.pt", weights_only=False)
    assert state["world_size"] == 1 and state["step"] == STEPS
    # another world size reads another split of the shards after the checkpoint: close to, not equal to, the run
    # that stayed on two hosts (README, "On a cluster")
    mine, ref = export_weights(alone), export_weights(reference)
    assert bitwise_equal(mine, ref) != []
    difference = relative_difference(ref["unet"], mine["unet"])
    print(f"one host from step 4 vs two hosts: relative difference {difference:.2e}")
    assert difference < 0.05


def test_elastic_job_continues_on_the_survivor(hosts, reference, tmp_path, tiny_shards, tiny_autoencoder):
    """torchrun --nnodes 1:2 with restarts (c10d rendezvous on host 0): host 1 dies mid-run (its link goes down,
    then its processes are killed, so nothing it sends reaches host 0). Host 0's rank fails at its next collective
    (DEEPSPEED_TIMEOUT: 1 minute), torchrun restarts it alone, and it resumes from the last complete checkpoint on
    world size 1 and finishes, with exactly the weights of a planned resume from that checkpoint on one host."""
    out = tmp_path / "run"
    args = cluster_args(tiny_shards, tiny_autoencoder, out)
    port, env = free_port(), train_env(DEEPSPEED_TIMEOUT="1")
    elastic = ("--rdzv-id", "elastic", "--max-restarts", "2")
    procs = [start_node(hosts, i, port, out, args, *elastic, nnodes="1:2", env=env) for i in (0, 1)]
    try:
        wait_for(lambda: (out / "checkpoints" / "latest").exists(), 600, "the first checkpoint", procs)
        hosts[1].link(False)
        died = time.time()
        for pid in run_processes(hosts[1], out):
            kill_pid(pid)
        procs[0].wait(900)
        finished = time.time() - died
    finally:
        hosts[1].link(True)
        for h in hosts.hosts:
            for pid in run_processes(h, out):
                kill_pid(pid)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    log = node_log(out, 0).read_text()
    assert procs[0].returncode == 0, log[-4000:]
    resumed = re.findall(r"resumed from \S+/(step\d{8}) at step (\d+)", log)
    assert len(resumed) == 1, log[-4000:]
    tag, step = resumed[0][0], int(resumed[0][1])
    print(f"host 1 died: host 0 resumed from {tag} alone and finished {finished:.0f} s later")
    assert 2 <= step < STEPS and latest_tag(out) == f"step{STEPS:08d}"
    state = torch.load(out / "checkpoints" / latest_tag(out) / "trainer_rank0.pt", weights_only=False)
    assert state["world_size"] == 1

    planned = tmp_path / "planned"
    (planned / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / tag, planned / "checkpoints" / tag)
    (planned / "checkpoints" / "latest").write_text(tag + "\n")
    run_nodes(hosts, planned, cluster_args(tiny_shards, tiny_autoencoder, planned), nodes=(0,))
    assert bitwise_equal(export_weights(out), export_weights(planned)) == []
    difference = relative_difference(export_weights(reference)["unet"], export_weights(out)["unet"])
    print(f"elastic run vs uninterrupted two-host run: relative difference {difference:.2e}")
    assert difference < 0.05
