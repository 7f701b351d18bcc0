"""The data position of a run: which epoch of the stream and how many of its micro-batches were consumed.

The training stream is a pure function of (seed, epoch, rank, worker), so the position (epoch, micro-batches
consumed) is all a checkpoint needs: a resumed run re-opens its epoch and skips what it had consumed, continuing
exactly. A checkpoint written with another data layout (world size or micro-batch) continues after the same number
of the epoch's samples instead, since every rank streams its own split of the shards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator

from ldm.config import DataConfig

log = logging.getLogger(__name__)
UNKNOWN_EPOCH_BATCHES = 1000  # micro-batches per epoch when the data has no index.json to count its samples


def batches_per_epoch(data: DataConfig, world_size: int) -> int:
    """Micro-batches per data epoch on each rank: data.batches_per_epoch, else one pass over the train split."""
    from ldm.data import dataset_size

    if data.batches_per_epoch:
        return data.batches_per_epoch
    total = dataset_size(data.latents or data.train, "train")
    if total is None:
        return UNKNOWN_EPOCH_BATCHES
    return max(1, total // (data.batch_size * world_size))


@dataclass
class DataPosition:
    """(epoch, micro-batches of it consumed) for one rank's stream of ``per_epoch`` micro-batches per epoch."""

    per_epoch: int
    epoch: int = 0
    consumed: int = 0

    def state(self) -> dict[str, int]:
        """What a checkpoint stores (a complete epoch is stored as the start of the next)."""
        epoch, consumed = self.epoch, self.consumed
        if consumed >= self.per_epoch:
            epoch, consumed = epoch + 1, 0
        return {"epoch": epoch, "epoch_batches": consumed}

    def restore(self, state: dict[str, Any], world_size: int, micro_batch: int) -> str | None:
        """Take the position of a checkpoint; returns a warning when its data layout was different."""
        self.epoch = state["epoch"]
        layout = (state.get("world_size", world_size), state.get("micro_batch", micro_batch))
        if layout == (world_size, micro_batch):
            self.consumed = state.get("epoch_batches", 0)
            return None
        samples = state.get("epoch_batches", 0) * layout[0] * layout[1]  # samples of this epoch, all ranks
        self.consumed = min(samples // (world_size * micro_batch), self.per_epoch)
        return (f"warning: checkpoint written by {layout[0]} processes x micro-batch {layout[1]}, resuming on "
                f"{world_size} x {micro_batch}: weights, optimizer, EMA and LR schedule are exact; the data stream "
                f"is re-split, continuing epoch {self.epoch} after {self.consumed} micro-batches per process")


def batch_stream(data: DataConfig, seed: int, rank: int, world_size: int, position: DataPosition,
                 pin_memory: bool = False) -> Iterator[dict]:
    """Endless per-rank stream of micro-batches from the position on, advancing it; equal counts on every rank.
    One loader serves every epoch (its workers persist with data.persistent_workers); ``pin_memory``: page-locked
    batches, for a run on CUDA."""
    from ldm.data import make_loader, resolve_shards

    urls = resolve_shards(data.latents or data.train, "train")
    loader = make_loader(urls, batch_size=data.batch_size, image_size=data.image_size, seed=seed, rank=rank,
                         world_size=world_size, num_workers=data.num_workers, shuffle_buffer=data.shuffle_buffer,
                         batches_per_epoch=position.per_epoch, caption=data.caption, flip=data.flip,
                         epoch=position.epoch, latents=data.latents is not None, pin_memory=pin_memory,
                         prefetch_factor=data.prefetch_factor, persistent_workers=data.persistent_workers)
    while True:
        loader.set_epoch(position.epoch)
        for i, batch in enumerate(loader):
            if i < position.consumed:
                continue  # consumed before the checkpoint we resumed from
            position.consumed = i + 1
            yield batch
        position.epoch += 1
        position.consumed = 0
