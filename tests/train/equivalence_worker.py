"""Worker for tests/train/test_equivalence.py, started by torchrun with 1 or 2 processes.

Runs the real Trainer (DeepSpeed engine, per-sample noise, EMA, checkpoints, export) on one fixed sequence of
*global* micro-batches read from real shards: rank r of W takes rows [r*b, (r+1)*b) of each, so every world
size and micro-batch size with the same global batch trains on identical data in identical order.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.train.equivalence_worker \
        GLOBAL_BATCH key=value ...
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    from ldm.config import LDMConfig, load_config
    from ldm.data import make_loader, resolve_shards
    from ldm.train.trainer import Trainer

    global_batch, overrides = int(argv[0]), argv[1:]
    cfg = load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml", overrides)
    trainer = Trainer(cfg)
    rank, world = trainer.dist.rank, trainer.dist.world_size
    b = global_batch // world
    assert b == cfg.data.batch_size, f"data.batch_size must be {global_batch} / {world}"
    micro_batches = cfg.train.max_steps * cfg.train.grad_accum
    loader = make_loader(resolve_shards(cfg.data.train, "train"), batch_size=global_batch,
                         image_size=cfg.data.image_size, seed=cfg.run.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                         batches_per_epoch=micro_batches, caption=cfg.data.caption)
    batches = list(loader)

    def my_slices():
        i = trainer.step * cfg.train.grad_accum  # a resumed run continues at the next global micro-batch
        while True:
            g = batches[i % len(batches)]
            i += 1
            yield {"image": g["image"][rank * b:(rank + 1) * b], "caption": g["caption"][rank * b:(rank + 1) * b],
                   "key": g["key"][rank * b:(rank + 1) * b], "skipped": 0}

    trainer._batches = my_slices
    result = trainer.train()
    return 0 if result["export"] or rank != 0 else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
