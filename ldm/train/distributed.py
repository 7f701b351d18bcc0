"""Process-group setup for DeepSpeed on GPUs (NCCL) or CPUs (gloo), with or without a launcher."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str = "auto") -> DistInfo:
    """Join (or create, when no launcher set RANK) the process group and pick this rank's device."""
    if "RANK" not in os.environ:  # plain `python -m ...` or pytest: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda:")
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # several processes on one machine's cores oversubscribe badly with more than their share of threads
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // max(local_world, 1)))
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", verbose=False)
    if use_cuda:
        dev = torch.device(device if device.startswith("cuda:") else f"cuda:{local_rank}")
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    return DistInfo(rank, world, local_rank, dev)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def mean_across_ranks(value: float) -> float:
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t) / torch.distributed.get_world_size()


def any_across_ranks(flag: bool) -> bool:
    """True on every rank when it is true on any rank (so all ranks take the same branch)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


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
    """The elementwise sum of a CPU tensor over all ranks (the tensor itself in a world of one)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return values
    out = values.clone()
    torch.distributed.all_reduce(out)
    return out
