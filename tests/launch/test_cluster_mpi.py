"""launch/deepspeed_hostfile.sh --launcher openmpi with Open MPI's real mpirun: two ranks (one host, the
namespace ldmnode0: nothing can leave it) whose rank, world size and local rank come from Open MPI's variables
(OMPI_COMM_WORLD_*, mapped by ldm.train.distributed), trained to the reference run's weights bit for bit."""

from __future__ import annotations

import subprocess

import pytest

from ldm.train.distributed import free_port
from tests.conftest import ROOT
from tests.launch.cluster import bitwise_equal, cluster_args, export_weights, require, train_env

pytestmark = pytest.mark.cluster


def test_openmpi_launches_two_ranks(hosts, reference, tmp_path, tiny_shards, tiny_autoencoder):
    require("mpirun", "ompi_info")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = tmp_path / "run"
    env = train_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run(hosts[0].argv("bash", str(ROOT / "launch/deepspeed_hostfile.sh"), str(hostfile),
                                        "--launcher", "openmpi", "--master-addr", "127.0.0.1",
                                        "--master-port", str(free_port()), "--no-ssh-check", "--",
                                        *cluster_args(tiny_shards, tiny_autoencoder, out)),
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    text = proc.stdout + proc.stderr
    print("\n".join(line for line in text.splitlines() if "cmd = mpirun" in line or "ldm.train.distributed" in line))
    assert proc.returncode == 0, text[-4000:]
    assert "cmd = mpirun -n 2 -hostfile" in text  # DeepSpeed's runner started mpirun, not its local launcher
    assert "from Open MPI" in text and "rank 1 of 2" in text
    assert bitwise_equal(export_weights(out), export_weights(reference)) == []
