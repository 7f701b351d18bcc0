"""Fixtures of the `cluster` tests: two hosts (network namespaces), a SLURM cluster on them, and the uninterrupted
reference run every fault and launcher is compared with bit for bit."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.launch.cluster import Hosts, Slurm, cluster_args, require, train_env, unavailable


@pytest.fixture(scope="session")
def hosts(tmp_path_factory):
    """Two hosts: network namespaces ldmnode0 (169.254.25.1, CPU 0) and ldmnode1 (169.254.25.2, CPU 1)."""
    require("ip", "nsenter", "unshare", "taskset", "mount")
    try:
        made = Hosts.create(tmp_path_factory.mktemp("hosts"))
    except subprocess.CalledProcessError as e:  # root without the capabilities (a container)
        unavailable(f"cannot create network namespaces: {' '.join(map(str, e.cmd))} exited {e.returncode}")
    yield made
    made.remove()


@pytest.fixture(scope="session")
def slurm(tmp_path_factory, hosts):
    """A SLURM cluster of the two hosts: slurmctld and a slurmd on ldmnode0, a slurmd on ldmnode1."""
    require("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "srun", "sinfo")
    cluster = Slurm.start(tmp_path_factory.mktemp("slurm"), hosts)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def reference(tmp_path_factory, hosts, tiny_shards, tiny_autoencoder) -> Path:
    """The uninterrupted run: ldm-train with two processes (launch/local.sh -n 2) on ldmnode0 with both CPUs, for
    STEPS steps."""
    out = tmp_path_factory.mktemp("reference") / "run"
    argv = ["bash", str(ROOT / "launch/local.sh"), "-n", "2", *cluster_args(tiny_shards, tiny_autoencoder, out)]
    proc = subprocess.run(hosts[0].argv(*argv, cpus="0,1" if os.cpu_count() > 1 else "0"), capture_output=True,
                          text=True, env=train_env(), cwd=out.parent, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out
