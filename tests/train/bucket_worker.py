"""Worker for tests/train/test_buckets_distributed.py, started by torchrun: the real Trainer (and `ldm-train`'s
config) with each micro-batch it consumes logged per rank (step, keys, shape) before the step uses it.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.train.bucket_worker LOG_DIR key=value ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    from ldm.config import LDMConfig, load_config
    from ldm.train.trainer import Trainer

    log_dir, overrides = Path(argv[0]), argv[1:]
    cfg = load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml", overrides)
    trainer = Trainer(cfg)
    stream = trainer._batches

    def logged():
        with open(log_dir / f"rank{trainer.dist.rank}.jsonl", "a") as f:
            for batch in stream():
                f.write(json.dumps({"step": trainer.step + 1, "keys": batch["key"],
                                    "shape": list(batch["image"].shape)}) + "\n")
                f.flush()
                yield batch

    trainer._batches = logged
    result = trainer.train()
    return 0 if result["export"] or trainer.dist.rank != 0 else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
