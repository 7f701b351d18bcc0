"""launch/deepspeed_hostfile.sh through DeepSpeed's real runner, with stand-ins for pdsh, mpirun and srun.

The runner builds the command each launcher is started with; the stand-ins record it (and srun's runs it
here), so these tests see what a cluster would run: no --num_nodes for MPI launchers (they refuse it), the
rendezvous exported to MPI processes, `ldm-train` reachable under --launcher slurm (no `-m` there), and
SIGUSR1 carried by pdsh to the workers below each host's DeepSpeed launcher in multi-node mode.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ldm.train.distributed import free_port
from tests.conftest import ROOT
from tests.launch.test_launch import clean_env

SCRIPT = ROOT / "launch" / "deepspeed_hostfile.sh"

FAKE_PDSH = r"""#!/usr/bin/env bash
# pdsh stand-in: logs its arguments; a DeepSpeed launch becomes a process with that launcher's command line
# and one worker below it; any other command (the signal) runs here, as on a one-host cluster.
echo "pdsh $*" >> "$(dirname "$0")/pdsh.log"
while [[ $# -gt 0 ]]; do case "$1" in -S) shift ;; -f|-w) shift 2 ;; *) break ;; esac; done
if [[ "$*" == *deepspeed.launcher.launch* ]]; then
  addr="$(grep -o -- '--master_addr=[^ ]*' <<<"$*")"
  port="$(grep -o -- '--master_port=[^ ]*' <<<"$*")"
  exec -a "python -u -m deepspeed.launcher.launch --world_info=x --node_rank=0 $addr $port" \
    "$FAKE_PYTHON" -c 'import subprocess, sys, os; sys.exit(subprocess.call([os.environ["FAKE_PYTHON"], os.environ["FAKE_WORKER"]]))'
fi
exec bash -c "$*"
"""

WORKER = """\
import os, pathlib, signal, time
marks = pathlib.Path(os.environ["MARKS"])
signal.signal(signal.SIGUSR1, lambda s, f: (marks.joinpath("usr1").write_text("worker got SIGUSR1"), os._exit(0)))
marks.joinpath("ready").write_text("ready")
time.sleep(120)
os._exit(3)
"""

FAKE_MPI = r"""#!/usr/bin/env bash
# mpirun / srun stand-in: logs its arguments and the rendezvous it was given; srun also runs its command
name="$(basename "$0")"
echo "$name $* | MASTER_ADDR=${MASTER_ADDR:-} MASTER_PORT=${MASTER_PORT:-}" >> "$(dirname "$0")/$name.log"
if [[ "$name" == srun ]]; then
  while [[ $# -gt 0 && "$1" != --export=* ]]; do shift; done
  shift
  SLURM_PROCID=0 SLURM_STEP_ID=0 SLURM_STEP_NUM_TASKS=1 SLURM_LOCALID=0 exec "$@"
fi
"""


def stubs(bin_dir: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, text in {"pdsh": FAKE_PDSH, "mpirun": FAKE_MPI, "srun": FAKE_MPI, "ompi_info": "#!/bin/sh\n",
                       "sinfo": "#!/bin/sh\n"}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)


def hostfile(tmp_path: Path) -> Path:
    path = tmp_path / "hosts"
    path.write_text("worker-0 slots=4\nworker-1 slots=4\n")
    return path


@pytest.mark.parametrize("launcher", ["openmpi", "slurm"])
def test_runner_starts_mpi_and_srun_launchers(tmp_path, launcher):
    bin_dir = tmp_path / "bin"
    stubs(bin_dir)
    port = str(free_port())
    env = clean_env(PATH=f"{bin_dir}:{clean_env()['PATH']}")
    proc = subprocess.run(["bash", str(SCRIPT), hostfile(tmp_path), "--launcher", launcher, "--master-port", port,
                           "--no-ssh-check", "--", "--help"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    if launcher == "openmpi":  # before: --num_nodes made the runner refuse ("does not support limiting")
        log = (bin_dir / "mpirun.log").read_text()
        assert log.startswith("mpirun -n 8 -hostfile ") and f"-x MASTER_ADDR=worker-0 -x MASTER_PORT={port}" in log
        assert log.rstrip().endswith(f"-u -m ldm.cli.train --help | MASTER_ADDR=worker-0 MASTER_PORT={port}")
    else:  # before: `python -u ldm.cli.train` (the --module flag dropped): "can't open file"
        log = (bin_dir / "srun.log").read_text()
        assert log.startswith("srun -n 8 --nodes 2 --export=ALL") and f"MASTER_ADDR=worker-0 MASTER_PORT={port}" in log
        assert f" -u {ROOT}/launch/ldm_train.py --help" in log
        assert "usage: ldm-train" in proc.stdout  # the file started ldm-train


def test_mpi_launcher_is_used_for_a_one_host_hostfile(tmp_path):
    """Before: with one host the runner took its local path (deepspeed.launcher.launch) and never ran mpirun."""
    bin_dir = tmp_path / "bin"
    stubs(bin_dir)
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=2\n")
    env = clean_env(PATH=f"{bin_dir}:{clean_env()['PATH']}")
    proc = subprocess.run(["bash", str(SCRIPT), hosts, "--launcher", "openmpi", "--master-port", str(free_port()),
                           "--no-ssh-check", "--", "--help"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (bin_dir / "mpirun.log").read_text().startswith("mpirun -n 2 -hostfile ")


def test_pdsh_multinode_sigusr1_reaches_the_workers_on_every_host(tmp_path):
    """Before: SIGUSR1 went to pdsh's ssh clients (which ignore it) and the script said it was forwarded."""
    bin_dir, marks = tmp_path / "bin", tmp_path / "marks"
    stubs(bin_dir)
    marks.mkdir()
    (tmp_path / "worker.py").write_text(WORKER)
    env = clean_env(PATH=f"{bin_dir}:{clean_env()['PATH']}", FAKE_PYTHON=sys.executable, MARKS=str(marks),
                    FAKE_WORKER=str(tmp_path / "worker.py"))
    proc = subprocess.Popen(["bash", str(SCRIPT), hostfile(tmp_path), "--master-addr", "127.0.0.1", "--master-port",
                             str(free_port()), "--no-ssh-check", "--", "--config", "x.yaml"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        deadline = time.time() + 240
        while not (marks / "ready").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "the stand-in worker did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert (marks / "usr1").read_text() == "worker got SIGUSR1"
    assert "SIGUSR1 sent to the training processes through: pdsh -S -w" in err
    assert "forwarded to" not in err
    calls = (bin_dir / "pdsh.log").read_text().splitlines()
    assert calls[0].startswith("pdsh -S -f 1024 -w worker-0,worker-1 ") and "deepspeed.launcher.launch" in calls[0]
    assert calls[1].startswith("pdsh -S -w worker-0,worker-1 for p in $(pgrep -f -- '[d]eepspeed.launcher.launch")
