"""Ranks from any launcher, never N silent worlds of one; reductions on a device the process group serves.

The launcher mapping is checked as a pure function for each launcher's variables, then for real: two
processes that carry only Open MPI's (or srun's) variables, as mpirun sets them, form one world of two. The
reduction dispatch is checked under a cuda-only backend configuration ("cuda:gloo", the CPU stand-in for
an NCCL-only group), where an all-reduce of a CPU tensor fails exactly as it does under NCCL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from ldm.train.distributed import LaunchError, cpu_threads, free_port, init_distributed, launch_environment
from tests.conftest import ROOT

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
RENDEZVOUS = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


def picked(env: dict[str, str]) -> tuple[str, str, str, str]:
    out = launch_environment(env)
    return out["RANK"], out["WORLD_SIZE"], out["LOCAL_RANK"], out["LOCAL_WORLD_SIZE"]


@pytest.mark.parametrize("env, expected", [
    ({}, ("0", "1", "0", "1")),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", **RENDEZVOUS}, ("3", "8", "1", "4")),
    # DeepSpeed's MPICH/Intel MPI runners: RANK, LOCAL_RANK and LOCAL_SIZE (not LOCAL_WORLD_SIZE)
    ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "4", **RENDEZVOUS}, ("5", "8", "1", "4")),
    ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "4", **RENDEZVOUS}, ("5", "8", "1", "4")),
    ({"MV2_COMM_WORLD_RANK": "2", "MV2_COMM_WORLD_SIZE": "4", "MV2_COMM_WORLD_LOCAL_RANK": "0",
      "MV2_COMM_WORLD_LOCAL_SIZE": "2", **RENDEZVOUS}, ("2", "4", "0", "2")),
    ({"PMI_RANK": "6", "PMI_SIZE": "8", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "4", **RENDEZVOUS},
     ("6", "8", "2", "4")),
    ({"SLURM_PROCID": "6", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "7", "SLURM_LOCALID": "2",
      "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "4,3", **RENDEZVOUS}, ("6", "7", "2", "3")),
    ({"SLURM_PROCID": "1", "SLURM_STEP_ID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "0",
      "SLURM_TASKS_PER_NODE": "4(x2)", **RENDEZVOUS}, ("1", "8", "1", "4")),
    # a batch script (SLURM_PROCID=0 and the job's task count, but no job step): one process, not rank 0 of 4
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}, ("0", "1", "0", "1")),
    # torchrun inside an srun step: torchrun's RANK wins over the step's task id
    ({"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "SLURM_PROCID": "1", "SLURM_STEP_ID": "0",
      "SLURM_NTASKS": "2", **RENDEZVOUS}, ("9", "16", "1", "16")),
])
def test_launcher_variables_map_to_ranks(env, expected):
    assert picked(env) == expected


def test_rendezvous_kept_for_many_and_made_up_for_one():
    assert launch_environment({"PMI_RANK": "0", "PMI_SIZE": "2", **RENDEZVOUS})["MASTER_ADDR"] == "10.0.0.1"
    alone = launch_environment({})
    assert alone["MASTER_ADDR"] == "127.0.0.1" and 0 < int(alone["MASTER_PORT"]) < 65536


@pytest.mark.parametrize("env, message", [
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT unset for rank 1 of 2"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4", "MASTER_ADDR": "h"}, "MASTER_PORT unset"),
    ({"LOCAL_RANK": "1"}, "LOCAL_RANK set but RANK is not"),
    ({"WORLD_SIZE": "4", "LOCAL_RANK": "0"}, "WORLD_SIZE and LOCAL_RANK set but RANK is not"),
    ({"RANK": "1"}, "WORLD_SIZE is not"),
    ({"RANK": "4", "WORLD_SIZE": "4", **RENDEZVOUS}, "rank 4 is not below the world size 4"),
    ({"PMI_RANK": "x", "PMI_SIZE": "2"}, "PMI_RANK='x' is not an integer"),
    ({"OMPI_COMM_WORLD_RANK": "0"}, "OMPI_COMM_WORLD_SIZE is not"),
])
def test_partial_launches_are_refused(env, message):
    with pytest.raises(LaunchError, match=message):
        launch_environment(env)


def test_init_refuses_an_mpi_rank_without_a_rendezvous(monkeypatch):
    """Before: no RANK meant a world of one, so mpirun -n 2 trained two independent models into one folder."""
    for key in DIST_VARS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match="rank 1 of 2"):
        init_distributed("cpu")
    assert "RANK" not in os.environ  # refused before anything was set or started


WORKER = textwrap.dedent("""
    import sys, torch
    from ldm.train.distributed import any_across_ranks, init_distributed, mean_across_ranks
    info = init_distributed("cpu")
    flag = any_across_ranks(info.rank == 1)
    mean = mean_across_ranks(float(info.rank))
    print(f"rank {info.rank} of {info.world_size}: any {flag} mean {mean} backend {torch.distributed.get_backend()}")
""")


def run_pair(per_rank_env, code: str = WORKER) -> list[str]:
    port = str(free_port())
    base = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith(("SLURM", "OMPI", "PMI"))}
    procs = [subprocess.Popen([sys.executable, "-c", code], env={**base, **per_rank_env(rank), "MASTER_ADDR": "127.0.0.1",
                                                                 "MASTER_PORT": port, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
             for rank in (0, 1)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return [line for out in outs for line in out.splitlines() if line.startswith(("rank ", "dispatch"))]


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["openmpi", "srun"])
def test_two_mpi_style_processes_form_one_world(launcher):
    def env(rank: int) -> dict[str, str]:
        if launcher == "openmpi":
            return {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK":
                    str(rank), "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
        return {"SLURM_PROCID": str(rank), "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": str(rank),
                "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "2"}

    lines = sorted(run_pair(env))
    assert lines == ["rank 0 of 2: any True mean 0.5 backend gloo", "rank 1 of 2: any True mean 0.5 backend gloo"]


DISPATCH = textwrap.dedent("""
    import os, torch
    from ldm.train import distributed as d
    torch.distributed.init_process_group(backend=os.environ["BACKEND"])
    rank = torch.distributed.get_rank()
    try:
        torch.distributed.all_reduce(torch.zeros(1))  # what the old any_across_ranks did
        cpu_tensor = "ok"
    except RuntimeError as e:
        cpu_tensor = "fails: " + str(e).splitlines()[0]
    print(f"dispatch {os.environ['BACKEND']}: {d.group_device_types()} -> {d.reduction_device()}; "
          f"preferring cpu -> {d.reduction_device('cpu')}; cpu tensor {cpu_tensor}")
    if "cpu" in d.group_device_types():
        print(f"rank {rank}: any {d.any_across_ranks(torch.tensor(rank == 0))} mean {d.mean_across_ranks(rank + 1.0)}")
    torch.distributed.destroy_process_group()
""")


@pytest.mark.distributed
def test_reductions_run_on_a_device_the_backend_serves():
    """Under a cuda-only group a CPU all-reduce fails ("No backend type associated with device type cpu", as
    under NCCL): the reductions pick the CUDA device there, and the CPU where the group serves it."""
    pair = {"WORLD_SIZE": "2"}
    cuda_only = sorted(run_pair(lambda r: {**pair, "RANK": str(r), "BACKEND": "cuda:gloo"}, DISPATCH))
    assert len(cuda_only) == 2 and cuda_only[0] == cuda_only[1]
    assert cuda_only[0].startswith("dispatch cuda:gloo: ['cuda'] -> cuda; preferring cpu -> cuda; cpu tensor fails")
    assert "No backend type associated with device type cpu" in cuda_only[0]
    both = sorted(run_pair(lambda r: {**pair, "RANK": str(r), "BACKEND": "cpu:gloo,cuda:gloo"}, DISPATCH))
    assert both[0] == "dispatch cpu:gloo,cuda:gloo: ['cpu', 'cuda'] -> cpu; preferring cpu -> cpu; cpu tensor ok"
    assert both[2:] == ["rank 0: any True mean 1.5", "rank 1: any True mean 1.5"]



@pytest.mark.parametrize("env, cores, expected", [
    ({"LOCAL_WORLD_SIZE": "1"}, 2, 2),  # alone on the node: every core
    ({"LOCAL_WORLD_SIZE": "2"}, 2, 1),  # two processes: a core each
    ({"LOCAL_WORLD_SIZE": "4"}, 2, 1),
    ({"LOCAL_WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"}, 2, None),  # the user's (or torchrun's) count is kept
])
def test_thread_count_is_the_users_else_a_share_of_the_cores(env, cores, expected):
    """A run beside other work that asks for one thread gets one: with more threads than cores every process
    spin-waits (a 1-thread step of the emoji UNet took 12-35 s instead of 0.3 s with 2 threads forced on 2 busy
    cores)."""
    assert cpu_threads(env, cores) == expected
