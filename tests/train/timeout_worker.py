"""Worker for tests/train/test_collective_timeout.py, started by torchrun with 2 processes: a ZeRO-1 engine built
as ldm-train builds it, then rank 1 goes silent while rank 0 all-gathers on ZeRO's data-parallel group.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.train.timeout_worker SECONDS
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta


def main(seconds: float) -> int:
    import torch

    from ldm.config import TrainConfig
    from ldm.train.distributed import align_collective_timeouts, init_distributed
    from ldm.train.engine import build_engine

    dist = init_distributed("cpu")
    engine = build_engine(torch.nn.Linear(4, 4), TrainConfig(zero_stage=1, warmup_steps=0, max_steps=1), 2)
    group = engine.optimizer.dp_process_group
    from deepspeed.constants import default_pg_timeout

    timeout = group._get_backend(torch.device("cpu")).options._timeout
    print(f"rank {dist.rank}: ZeRO group timeout {timeout}, DeepSpeed's {default_pg_timeout}", flush=True)
    align_collective_timeouts(timedelta(seconds=seconds))
    torch.distributed.barrier()
    if dist.rank == 1:
        time.sleep(seconds + 60)  # silent: rank 0 must give up on its own
        os._exit(0)
    start = time.time()
    try:
        torch.distributed.all_gather_into_tensor(torch.empty(2), torch.ones(1), group=group)
    except RuntimeError as e:
        print(f"rank 0: the all-gather failed after {time.time() - start:.1f} s: {str(e)[:120]}", flush=True)
        os._exit(3)
    print("rank 0: the all-gather returned", flush=True)
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main(float(sys.argv[1])))
