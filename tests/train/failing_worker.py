"""Worker for tests/train/test_rank_failure.py, started by torchrun with 2 processes: the real ldm-train, except that
the sample grid (work only rank 0 does) raises on rank 0 at its first interval.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.train.failing_worker key=value ...
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    from ldm.cli.train import main as train_main
    from ldm.train import hooks

    def broken(self, ema_state, step):
        if os.environ.get("RANK") == "0":
            raise RuntimeError(f"validation broke on rank 0 at step {step}")
        raise AssertionError("only rank 0 draws the sample grid")

    hooks.SampleGrid.__call__ = broken
    return train_main(["--config", str(ROOT / "configs/ldm/emoji.yaml"), *argv])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
