"""Process-group setup for DeepSpeed on GPUs (NCCL) or CPUs (gloo), with or without a launcher.

Launchers that set RANK (torchrun, DeepSpeed's pdsh/local launcher, MPICH/Intel MPI through DeepSpeed's
helper) are used as they are. Launchers that set only their own variables (mpirun of Open MPI or MVAPICH,
srun, an MPI's PMI) are mapped to RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE; a process that sees
signs of a multi-process launch it cannot map is refused, never turned into one of N worlds of one.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class LaunchError(RuntimeError):
    """The environment of a multi-process launch that names no usable rank, world size or rendezvous."""


# launcher -> its (rank, world size, local rank, local world size) variables, in the order they are tried
LAUNCHER_VARIABLES: dict[str, tuple[str, str, str, str]] = {
    "Open MPI": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                 "OMPI_COMM_WORLD_LOCAL_SIZE"),
    "MVAPICH": ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK",
                "MV2_COMM_WORLD_LOCAL_SIZE"),
    "MPICH/Intel MPI (PMI)": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    # srun tasks only: the batch script has SLURM_PROCID=0 and the job's SLURM_NTASKS but no step id
    "SLURM (srun)": ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        value = int(env[name])
    except ValueError:
        raise LaunchError(f"{name}={env[name]!r} is not an integer") from None
    if value < 0:
        raise LaunchError(f"{name}={value} is negative")
    return value


def _tasks_on_this_node(spec: str, node: int) -> int:
    """SLURM's tasks-per-node list ("4(x2),3": 4, 4, 3) at index `node`."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise LaunchError(f"cannot read the SLURM tasks-per-node list {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[min(node, len(counts) - 1)]


def launch_environment(env: Mapping[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT for this process (and
    LDM_RANK_FROM: the variables they came from, "RANK", a launcher's name, or "none" for a single process).

    Raises LaunchError where the process is one of several but its rank, the world size or (for more than
    one process) the rendezvous address is missing.
    """
    out: dict[str, str] = {}
    if "RANK" in env:
        if "WORLD_SIZE" not in env:
            raise LaunchError("RANK is set but WORLD_SIZE is not: a launcher set a partial environment")
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else (
            _int(env, "LOCAL_SIZE") if "LOCAL_SIZE" in env else world)
        source = "RANK"
    else:
        found = next(((name, keys) for name, keys in LAUNCHER_VARIABLES.items() if keys[0] in env
                      and (name != "SLURM (srun)" or "SLURM_STEP_ID" in env)), None)
        if found is None:
            stray = [k for k in ("WORLD_SIZE", "LOCAL_RANK") if k in env and not (k == "WORLD_SIZE" and env[k] == "1")]
            if stray:
                raise LaunchError(f"{' and '.join(stray)} set but RANK is not: launch with torchrun, DeepSpeed, "
                                  "mpirun or srun (which set the rank), or unset them for a single process")
            rank, world, local_rank, local_world, source = 0, 1, 0, 1, "none"
        else:
            source, (rank_key, size_key, local_key, local_size_key) = found
            if source == "SLURM (srun)" and size_key not in env:
                size_key = "SLURM_NTASKS"
            if size_key not in env:
                raise LaunchError(f"{source}: {rank_key} is set but {size_key} is not")
            rank, world = _int(env, rank_key), _int(env, size_key)
            local_rank = _int(env, local_key) if local_key in env else 0
            if source == "SLURM (srun)":
                spec = env.get(local_size_key) or env.get("SLURM_TASKS_PER_NODE")
                node = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
                local_world = _tasks_on_this_node(spec, node) if spec else world
            else:
                local_world = _int(env, local_size_key) if local_size_key in env else world
    if world < 1 or rank >= world:
        raise LaunchError(f"rank {rank} is not below the world size {world} (from {source})")
    if local_rank >= max(local_world, 1):
        raise LaunchError(f"local rank {local_rank} is not below the local world size {local_world} (from {source})")
    out.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(local_world),
               LDM_RANK_FROM=source)
    if world > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise LaunchError(f"{' and '.join(missing)} unset for rank {rank} of {world} (from {source}): export "
                              "the rendezvous host and port to every process (launch/deepspeed_hostfile.sh does)")
        out.update(MASTER_ADDR=env["MASTER_ADDR"], MASTER_PORT=env["MASTER_PORT"])
    else:
        out.update(MASTER_ADDR=env.get("MASTER_ADDR") or "127.0.0.1", MASTER_PORT=env.get("MASTER_PORT") or str(free_port()))
    return out


def cpu_threads(env: Mapping[str, str], cores: int) -> int | None:
    """Threads for a CPU process: its share of the node's cores (several processes with more than their share
    oversubscribe badly: spin-waiting threads, 10-100x slower steps); None (keep) when OMP_NUM_THREADS is set, by
    the user (a run beside other work) or by torchrun (1)."""
    if env.get("OMP_NUM_THREADS"):
        return None
    return max(1, cores // max(int(env.get("LOCAL_WORLD_SIZE", "1")), 1))


def init_distributed(device: str = "auto") -> DistInfo:
    """Join (or create, for a single process) the process group and pick this rank's device."""
    os.environ.update(launch_environment(os.environ))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if world > 1:
        log.info("rank %d of %d (local rank %d of %s on %s), from %s", rank, world, local_rank,
                 os.environ["LOCAL_WORLD_SIZE"], socket.gethostname(), os.environ["LDM_RANK_FROM"])
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda:")
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = cpu_threads(os.environ, cores)
        if threads is not None:
            torch.set_num_threads(threads)
    import deepspeed

    if use_cuda:
        dev = torch.device(device if device.startswith("cuda:") else f"cuda:{local_rank}")
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not torch.distributed.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if world == 1:  # an in-memory store: no rendezvous port to lose to another process between picking and binding
            torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)  # wraps a group
        # torn down before the interpreter exits (local, no collective): a group left to the interpreter's teardown can
        # abort the process in gloo's threads ("terminate called without an active exception") after a clean run
        atexit.register(_destroy_group)
    return DistInfo(rank, world, local_rank, dev)


def align_collective_timeouts(timeout: timedelta | None = None) -> int:
    """Give every process group of this rank one collective timeout: ``timeout``, by default DeepSpeed's (10 minutes;
    ``DEEPSPEED_TIMEOUT=<minutes>`` changes it). Call it once the engine exists.

    DeepSpeed gives the timeout to the default group only; the groups it makes for ZeRO get torch's default (30
    minutes under gloo), so a rank left in a ZeRO all-gather by a peer whose link was cut waited 30 minutes whatever
    DEEPSPEED_TIMEOUT said. Returns how many groups were set (0 for one process)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return 0
    if timeout is None:
        from deepspeed.constants import default_pg_timeout as timeout
    from torch.distributed import distributed_c10d

    set_timeout = getattr(torch.distributed, "set_timeout", None) or getattr(distributed_c10d, "_set_pg_timeout", None)
    groups = getattr(getattr(distributed_c10d, "_world", None), "pg_map", None)
    if set_timeout is None or groups is None:  # torch < 2.3
        log.warning("torch %s cannot change a process group's timeout: groups made after the first keep torch's "
                    "default", torch.__version__)
        return 0
    count = 0
    for group in list(groups):
        try:
            set_timeout(timeout, group)
        except ValueError:  # not a member
            continue
        count += 1
    return count


def _destroy_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def group_device_types(group=None) -> list[str]:
    """Device types the process group can reduce on: "nccl" -> cuda; "cpu:gloo,cuda:nccl" -> cpu, cuda."""
    backend = str(torch.distributed.get_backend(group))
    if ":" in backend:
        return [pair.split(":", 1)[0].strip() for pair in backend.split(",")]
    return list(torch.distributed.Backend.backend_capability.get(backend, ["cpu"]))


def reduction_device(preferred: torch.device | str | None = None, group=None) -> torch.device:
    """Where an all-reduce of a small tensor can run: `preferred` if the group's backend serves its device
    type, else the CPU if it serves that (gloo), else the current CUDA device (an NCCL-only group)."""
    types = group_device_types(group)
    if preferred is not None and torch.device(preferred).type in types:
        return torch.device(preferred)
    if "cpu" in types:
        return torch.device("cpu")
    if "cuda" in types:
        return torch.device("cuda")  # the current device (set by init_distributed)
    return torch.device(types[0])


def reduce_scalar(value: float | bool | torch.Tensor, op: str = "sum", device: torch.device | str | None = None,
                  group=None) -> torch.Tensor:
    """All-reduce one number (op "sum" or "max") over the group; returns a tensor on the reduction device.

    A tensor argument (e.g. a flag computed on the GPU) is reduced where it lives when the backend serves
    that device: no copy to the host before the collective.
    """
    if isinstance(value, torch.Tensor):
        where = reduction_device(value.device, group)
        t = value.detach().reshape(1).to(device=where, dtype=torch.float64)
    else:
        where = reduction_device(device, group)
        t = torch.tensor([float(value)], dtype=torch.float64, device=where)
    reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
    torch.distributed.all_reduce(t, op=reduce_op, group=group)
    return t


def _single_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1


def mean_across_ranks(value: float, device: torch.device | str | None = None) -> float:
    """The mean of `value` over all ranks (reduced on `device` when the process group serves it)."""
    if _single_process():
        return value
    return float(reduce_scalar(value, "sum", device)) / torch.distributed.get_world_size()


def any_across_ranks(flag: bool | torch.Tensor, device: torch.device | str | None = None) -> bool:
    """True on every rank when it is true on any rank (so all ranks take the same branch).

    `flag` may be a bool or a one-element tensor; under an NCCL-only group the reduction runs on the GPU.
    """
    if _single_process():
        return bool(flag)
    return bool(reduce_scalar(flag, "max", device).item() > 0)


class RankFailed(RuntimeError):
    """Raised on the other ranks when rank 0 failed in work that only rank 0 does."""


def on_main(fn, what: str):
    """Run ``fn`` on rank 0 only; every rank learns whether it failed and raises then (collective, no barrier).

    Work that only rank 0 does (sample grids, evaluation, export, tracking) is followed by this agreement instead of
    a barrier, so an exception on rank 0 makes every rank exit with an error instead of waiting for rank 0 until
    the collective timeout. Returns fn's result on rank 0 and None elsewhere.
    """
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after every rank has heard of it
            error = e
    failed = any_across_ranks(error is not None)
    if error is not None:
        raise error
    if failed:
        raise RankFailed(f"rank 0 failed during {what}; see its error")
    return result


def sum_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of a tensor over all ranks (itself in a world of one), reduced on a device the group's
    backend serves and returned where it came from."""
    if _single_process():
        return values
    out = values.detach().to(reduction_device(values.device), copy=True)
    torch.distributed.all_reduce(out)
    return out.to(values.device)
