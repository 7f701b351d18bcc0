"""The prefetching loader: more batches prepared ahead and workers kept across epochs change no batch, the kept
workers do move on to the next epoch, and a pass stopped early starts its epoch again (as fresh workers would).
Pinned batches need CUDA: tests/gpu checks them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.config import DataConfig
from ldm.data import make_loader
from ldm.data.shards import write_shards
from ldm.data.run_stream import DataPosition, batch_stream
from tests.data.test_shards_stream import synthetic_sample

ARGS = dict(batch_size=4, image_size=8, seed=2, shuffle_buffer=8, batches_per_epoch=5, num_workers=2)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("synth")
    names, _ = write_shards((synthetic_sample(i) for i in range(40)), out, "train", samples_per_shard=10)
    return [str(out / n) for n in names]


def epoch(loader) -> list[tuple[list[str], torch.Tensor]]:
    return [(b["key"], b["image"]) for b in loader]


def assert_same(a, b) -> None:
    assert [keys for keys, _ in a] == [keys for keys, _ in b]
    for (_, x), (_, y) in zip(a, b):
        assert torch.equal(x, y)


def test_prefetch_and_persistent_workers_give_the_same_batches(synth):
    fresh_loader = make_loader(synth, **ARGS)
    fresh = [epoch(fresh_loader) for _ in range(3)]
    kept_loader = make_loader(synth, **ARGS, prefetch_factor=4, persistent_workers=True)
    kept, loaders = [], []
    for _ in range(3):
        kept.append(epoch(kept_loader))
        loaders.append(kept_loader._kept[1])
    for a, b in zip(kept, fresh):
        assert_same(a, b)
    assert loaders[0] is loaders[1] is loaders[2]  # one set of workers served every epoch
    assert fresh[0][0][0] != fresh[1][0][0]  # and the epochs differ: the kept workers moved on


def test_a_pass_stopped_early_restarts_its_epoch(synth):
    reference = make_loader(synth, **ARGS)
    first, second = epoch(reference), epoch(reference)
    loader = make_loader(synth, **ARGS, persistent_workers=True)
    stopped = iter(loader)
    next(stopped)
    stopped.close()  # a consumer that stops mid-epoch (e.g. a rollback): the epoch does not count
    assert loader._kept is None
    assert_same(epoch(loader), first)
    assert_same(epoch(loader), second)


def test_the_training_stream_is_the_same_with_kept_workers(synth):
    """batch_stream (what the trainer reads) over 2.5 epochs of 3 micro-batches, from a resumed position."""
    spec = str(Path(synth[0]).parent)

    def stream(persistent: bool) -> list[list[str]]:
        data = DataConfig(train=spec, val=None, image_size=8, batch_size=4, num_workers=2, shuffle_buffer=8,
                          batches_per_epoch=3, persistent_workers=persistent, prefetch_factor=3)
        position = DataPosition(3, epoch=1, consumed=1)
        batches = batch_stream(data, seed=5, rank=0, world_size=1, position=position)
        return [next(batches)["key"] for _ in range(8)]

    assert stream(True) == stream(False)
