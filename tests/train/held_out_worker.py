"""Worker for tests/train/test_held_out_loss.py, started by torchrun with 1 or 2 processes: builds the real Trainer
(same seeded initial weights on any world size) and prints the held-out loss of those weights as JSON on rank 0.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.train.held_out_worker key=value ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    from ldm.config import LDMConfig, load_config
    from ldm.train import Trainer

    cfg = load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml", argv)
    trainer = Trainer(cfg)
    metrics = trainer.held_out(trainer.engine)
    if trainer.dist.is_main:
        print("HELD_OUT " + json.dumps(metrics), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
