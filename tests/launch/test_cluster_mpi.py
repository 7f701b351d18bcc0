"""launch/deepspeed_hostfile.sh --launcher openmpi with Open MPI's real mpirun on the two hosts: mpirun (on
ldmnode0) starts its orted on ldmnode1 through an rsh agent that enters that host's namespaces (what ssh does on a
cluster), one rank per host; rank, world size and local rank come from Open MPI's variables (OMPI_COMM_WORLD_*,
mapped by ldm.train.distributed), and the run trains to the reference run's weights bit for bit."""

from __future__ import annotations

import shlex
import subprocess

import pytest

from ldm.train.distributed import free_port
from tests.conftest import ROOT
from tests.launch.cluster import bitwise_equal, cluster_args, export_weights, require, train_env

pytestmark = pytest.mark.cluster

RSH_AGENT = """#!/bin/sh
# mpirun's rsh agent (plm_rsh_agent), standing in for ssh: "AGENT HOST COMMAND..." runs COMMAND on HOST
host="$1"
shift
exec "$(dirname "$0")/on-$host" sh -c "$*"
"""


def test_openmpi_launches_one_rank_per_host(hosts, reference, tmp_path, tiny_shards, tiny_autoencoder):
    require("mpirun", "ompi_info")
    agent = tmp_path / "rsh"
    agent.write_text(RSH_AGENT)
    for h in hosts.hosts:
        (tmp_path / f"on-{h.name}").write_text(f"#!/bin/sh\nexec {shlex.join(h.argv())} \"$@\"\n")
    for script in tmp_path.iterdir():
        script.chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{h.name} slots=1\n" for h in hosts.hosts))
    out = tmp_path / "run"
    env = train_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_plm_rsh_agent=str(agent))
    proc = subprocess.run(hosts[0].argv("bash", str(ROOT / "launch/deepspeed_hostfile.sh"), str(hostfile),
                                        "--launcher", "openmpi", "--master-port", str(free_port()), "--no-ssh-check",
                                        "--", *cluster_args(tiny_shards, tiny_autoencoder, out)),
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    text = proc.stdout + proc.stderr
    print("\n".join(line for line in text.splitlines() if "cmd = mpirun" in line or "ldm.train.distributed" in line))
    assert proc.returncode == 0, text[-4000:]
    assert "cmd = mpirun -n 2 -hostfile" in text  # DeepSpeed's runner started mpirun, not its local launcher
    assert "rank 0 of 2 (local rank 0 of 1 on ldmnode0), from Open MPI" in text
    assert "rank 1 of 2 (local rank 0 of 1 on ldmnode1), from Open MPI" in text
    assert bitwise_equal(export_weights(out), export_weights(reference)) == []
