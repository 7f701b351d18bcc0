"""A run's streams from its data section: the training micro-batches from a data position on (image shards, latent or
text caches, aspect-ratio buckets), and the held-out samples. Which shards each reads is ``ldm.data.source``'s choice.

The training stream is a pure function of (seed, epoch, rank, worker), so the position (epoch, micro-batches
consumed) is all a checkpoint needs: a resumed run re-opens its epoch and skips what it had consumed, continuing
exactly. A checkpoint written with another data layout (world size or micro-batch; with aspect-ratio buckets also
the accumulation, since global batches are planned whole) continues after the same number of the epoch's samples
instead, since every rank streams its own split of the shards.

With ``data.buckets`` an epoch is the bucket plan of ``ldm.data.buckets`` (one pass over the data set, each global
batch of one size), computed once per run and kept by the position; its micro-batches are read by index, so resuming
starts at the position without reading the consumed ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ldm.config import DataConfig
from ldm.data.buckets import assign, bucket_batches, bucket_sizes, build_manifest, plan_report
from ldm.data.skips import NoUsableData
from ldm.data.source import held_out_source, train_source
from ldm.data.stream import dataset_size, make_loader, resolve_shards

UNKNOWN_EPOCH_BATCHES = 1000  # micro-batches per epoch when the data has no index.json to count its samples


@dataclass
class Buckets:
    """The bucketed data set of a run: its sizes, manifest and each sample's bucket."""

    sizes: list
    manifest: Any
    bucket_of: list[int]

    @classmethod
    def of(cls, data: DataConfig) -> "Buckets":
        src = train_source(data)
        b = data.buckets
        sizes = bucket_sizes(b.sizes, data.image_size, b.multiple, b.max_ratio)
        manifest = build_manifest(resolve_shards(src.spec, "train"), src.holdout)
        return cls(sizes, manifest, assign(manifest, sizes))


def batches_per_epoch(data: DataConfig, world_size: int, grad_accum: int = 1, buckets: Buckets | None = None) -> int:
    """Micro-batches per data epoch on each rank: data.batches_per_epoch, else one pass over the train split (with
    buckets: the plan's global batches times the accumulation)."""
    if data.buckets is not None:
        buckets = buckets or Buckets.of(data)
        total, global_batch = len(buckets.bucket_of), data.batch_size * world_size * grad_accum
        if total < global_batch:
            raise NoUsableData(f"data.buckets: {total} training images with a readable image header, fewer than one "
                               f"global batch of {global_batch} (processes x train.grad_accum x data.batch_size)")
        return total // global_batch * grad_accum
    if data.batches_per_epoch:
        return data.batches_per_epoch
    src = train_source(data)
    total = dataset_size(src.spec, "train", src.holdout)
    if total is None:
        return UNKNOWN_EPOCH_BATCHES
    return max(1, total // (data.batch_size * world_size))


@dataclass
class DataPosition:
    """(epoch, micro-batches of it consumed) for one rank's stream of ``per_epoch`` micro-batches per epoch."""

    per_epoch: int
    epoch: int = 0
    consumed: int = 0
    grad_accum: int | None = None  # set when the stream's epoch depends on it (buckets plan whole global batches)
    report: list[str] = field(default_factory=list)  # what the data layout does (the bucket plan), for the log
    buckets: Buckets | None = field(default=None, repr=False)  # the bucket plan the epochs follow (data.buckets)

    @classmethod
    def of(cls, data: DataConfig, world_size: int, grad_accum: int) -> "DataPosition":
        """The start of a run's stream (and, with buckets, the plan and its report)."""
        if data.buckets is None:
            return cls(batches_per_epoch(data, world_size, grad_accum))
        b = Buckets.of(data)
        per_epoch = batches_per_epoch(data, world_size, grad_accum, b)
        report = plan_report(b.bucket_of, b.sizes, data.batch_size * world_size * grad_accum, b.manifest.skipped)
        return cls(per_epoch, grad_accum=grad_accum, report=report, buckets=b)

    def state(self) -> dict[str, int]:
        """What a checkpoint stores (a complete epoch is stored as the start of the next)."""
        epoch, consumed = self.epoch, self.consumed
        if consumed >= self.per_epoch:
            epoch, consumed = epoch + 1, 0
        return {"epoch": epoch, "epoch_batches": consumed,
                **({"grad_accum": self.grad_accum} if self.grad_accum is not None else {})}

    def restore(self, state: dict[str, Any], world_size: int, micro_batch: int) -> str | None:
        """Take the position of a checkpoint; returns a warning when its data layout was different."""
        self.epoch = state["epoch"]
        layout = (state.get("world_size", world_size), state.get("micro_batch", micro_batch),
                  state.get("grad_accum", self.grad_accum))
        if layout == (world_size, micro_batch, self.grad_accum):
            self.consumed = state.get("epoch_batches", 0)
            return None
        samples = state.get("epoch_batches", 0) * layout[0] * layout[1]  # samples of this epoch, all ranks
        self.consumed = min(samples // (world_size * micro_batch), self.per_epoch)
        if self.grad_accum:
            self.consumed -= self.consumed % self.grad_accum  # at a global batch's start
        return (f"warning: checkpoint written by {layout[0]} processes x micro-batch {layout[1]}"
                f"{f' x accumulation {layout[2]}' if layout[2] else ''}, resuming on {world_size} x {micro_batch}"
                f"{f' x {self.grad_accum}' if self.grad_accum else ''}: weights, optimizer, EMA and LR schedule are "
                f"exact; the data stream is re-split, continuing epoch {self.epoch} after {self.consumed} "
                "micro-batches per process")


def batch_stream(data: DataConfig, seed: int, rank: int, world_size: int, position: DataPosition,
                 pin_memory: bool = False) -> Iterator[dict]:
    """Endless per-rank stream of micro-batches from the position on, advancing it; equal counts on every rank.
    One loader serves every epoch (its workers persist with data.persistent_workers); ``pin_memory``: page-locked
    batches, for a run on CUDA."""
    src = train_source(data)
    if data.buckets is not None:
        yield from _bucket_stream(data, src.text, seed, rank, world_size, position)
        return
    urls = resolve_shards(src.spec, "train")
    loader = make_loader(urls, batch_size=data.batch_size, image_size=data.image_size, seed=seed, rank=rank,
                         world_size=world_size, num_workers=data.num_workers, shuffle_buffer=data.shuffle_buffer,
                         batches_per_epoch=position.per_epoch, caption=data.caption, flip=data.flip,
                         epoch=position.epoch, latents=src.latents, holdout=src.holdout, text=src.text,
                         pin_memory=pin_memory, prefetch_factor=data.prefetch_factor,
                         persistent_workers=data.persistent_workers)
    while True:
        loader.set_epoch(position.epoch)
        for i, batch in enumerate(loader):
            if i < position.consumed:
                continue  # consumed before the checkpoint we resumed from
            position.consumed = i + 1
            yield batch
        position.epoch += 1
        position.consumed = 0


def _bucket_stream(data: DataConfig, text: bool, seed: int, rank: int, world_size: int,
                   position: DataPosition) -> Iterator[dict]:
    if position.buckets is None:
        position.buckets = Buckets.of(data)
    b = position.buckets
    while True:
        for batch in bucket_batches(b.manifest, b.sizes, b.bucket_of, batch_size=data.batch_size, rank=rank,
                                    world_size=world_size, grad_accum=position.grad_accum, seed=seed,
                                    epoch=position.epoch, start=position.consumed, num_workers=data.num_workers,
                                    caption=data.caption, text=text, flip=data.flip):
            position.consumed += 1
            yield batch
        position.epoch += 1
        position.consumed = 0


def held_out_batches(data: DataConfig, batch_size: int) -> tuple[Iterable[dict], str]:
    """(batches, the shards' spec) of the held-out samples (``source.held_out_source``): one pass in shard order,
    identical on every rank."""
    src = held_out_source(data)
    loader = make_loader(resolve_shards(src.spec, "val"), batch_size=batch_size, image_size=data.image_size,
                         shuffle_buffer=0, caption=data.caption, holdout=src.holdout, text=src.text,
                         latents=src.latents)
    return loader, src.spec
