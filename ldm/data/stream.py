"""The training stream: WebDataset shards -> shuffled, decoded, captioned batches.

Shards are split by rank explicitly (no torch.distributed lookup) and then by DataLoader worker.
With `batches_per_epoch` the shards are resampled with replacement and every rank yields exactly
that many batches, so no rank waits on another at the end of an epoch (unequal counts hang DDP).
Without it the stream is one pass over this rank's shards (single process, validation).
Bad samples are logged, counted and skipped; they never stop the stream.

A data spec is a folder with index.json (what ``ldm-shards`` writes), a folder of ``train-*.tar`` /
``val-*.tar``, any other folder of ``*.tar`` shards (an img2dataset output: ``00000.tar``, ``00001.tar``...,
all of it training data), an index.json, or a URL / brace / glob pattern. Specs without splits get a
validation part by a stable hash of each sample's key (``resolve_split`` with ``val_fraction``; the stream
keeps its part with a ``KeyHoldout``).
"""

from __future__ import annotations

import glob
import itertools
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from ldm.data.decode import CAPTION_MODES, Decoded, collate, decode_sample
from ldm.data.skips import SkipCounter, open_shards
from ldm.data.split import SPLITS, KeyHoldout


def _local(spec: str) -> Path | None:
    """The local path of a spec, or None for URLs and pipe: commands."""
    return None if spec.startswith("pipe:") or "://" in spec else Path(spec).expanduser()


def _plain_shards(folder: Path) -> list[str]:
    """The ``*.tar`` files of a folder without index.json or split naming, in name order."""
    tars = sorted(str(p) for p in folder.glob("*.tar") if p.is_file())
    if not tars:
        raise ValueError(f"{folder}: no shards in this folder (no index.json and no *.tar files)")
    return tars


def has_splits(spec: str) -> bool:
    """True when a spec names its splits: an index.json (or a folder with one) or a folder of train-/val- shards."""
    path = _local(str(spec))
    if path is None:
        return False
    if path.is_dir():
        return (path / "index.json").is_file() or any(any(path.glob(f"{s}-*.tar")) for s in SPLITS)
    return path.is_file() and path.suffix == ".json"


def has_split(spec: str, split: str) -> bool:
    """True when ``resolve_shards`` finds shards of ``split`` in the spec."""
    try:
        resolve_shards(spec, split)
    except ValueError:
        return False
    return True


def dataset_size(spec: str, split: str = "train", holdout: KeyHoldout | None = None) -> int | None:
    """Number of samples of a split: from index.json, or for a local folder of plain shards by reading their tar
    headers (only the holdout's part with a holdout); None when unknown (URL patterns, a split the spec lacks)."""
    path = _local(str(spec))
    if path is None:
        return None
    if path.is_dir() and not has_splits(str(path)):
        return sum(1 for key in iter_keys(_plain_shards(path)) if holdout is None or holdout.keeps(key))
    if path.is_dir():
        path = path / "index.json"
    if not (path.is_file() and path.suffix == ".json"):
        return None
    info = json.loads(path.read_text(encoding="utf-8")).get("splits", {}).get(split)
    return int(info["total"]) if info else None


def iter_keys(shards: Iterable[str]) -> Iterator[str]:
    """Sample keys of local tar shards in stream order, from the tar headers alone (file contents are skipped).

    An unreadable or truncated shard gives the keys read before the damage (the stream skips and reports it)."""
    import tarfile

    for shard in shards:
        last, suffixes = None, set()
        try:
            with tarfile.open(shard, mode="r:") as tar:
                for member in tar:
                    base, ext = base_plus_ext(member.name) if member.isfile() else (None, None)
                    if base is None or (base.startswith("__") and "/" not in base):
                        continue
                    if base != last or ext in suffixes:  # a new sample, as webdataset's group_by_keys starts one
                        if last is not None:
                            yield last
                        last, suffixes = base, set()
                    suffixes.add(ext)
        except (tarfile.TarError, OSError):
            last = None  # the damaged shard's last sample may be incomplete: not counted
        if last is not None:
            yield last


def resolve_shards(spec: str, split: str = "train") -> list[str]:
    """Shard URLs of a spec: a folder with index.json, a folder of split or plain (img2dataset) shards, an
    index.json, or a URL / brace / glob pattern. A folder of plain shards, like a pattern, is one split: all
    of it, whichever split is asked for (a separate validation folder; hold a part out with ``resolve_split``)."""
    spec = str(spec)
    if spec.startswith("pipe:") or "://" in spec:
        return list(braceexpand.braceexpand(spec))
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "index.json").is_file():
        path = path / "index.json"
    if path.is_file() and path.suffix == ".json":
        index = json.loads(path.read_text(encoding="utf-8"))
        splits = index.get("splits", {})
        if split not in splits:
            raise ValueError(f"{spec}: no split {split!r} in index (has {sorted(splits)})")
        shards = [str(path.parent / name) for name in splits[split]["shards"]]
        if not shards:
            raise ValueError(f"{spec}: split {split!r} has no shards")
        return shards
    if path.is_dir():
        if not has_splits(str(path)):
            return _plain_shards(path)
        shards = sorted(glob.glob(str(path / f"{split}-*.tar")))
    else:
        shards, missing = [], []
        for pattern in braceexpand.braceexpand(str(path)):
            if any(c in pattern for c in "*?["):
                shards += sorted(glob.glob(pattern))
            elif Path(pattern).is_file():
                shards.append(pattern)
            else:
                missing.append(pattern)
        if shards and missing:  # a brace range past the last shard is a typo, not a smaller dataset
            raise ValueError(f"{spec!r}: {len(missing)} of its shards are missing, e.g. {missing[0]}")
    if not shards:
        raise ValueError(f"no shards match {spec!r} (split {split!r})")
    return shards


def resolve_split(spec: str, split: str = "train", val_fraction: float = 0.0,
                  seed: int = 0) -> tuple[list[str], KeyHoldout | None]:
    """Shards of a split and, for a spec without splits and val_fraction > 0, the KeyHoldout that keeps this
    split's part of them (pass it to ``make_loader``). Splits a spec names itself always win."""
    if val_fraction == 0 or has_splits(str(spec)):
        return resolve_shards(spec, split), None
    holdout = KeyHoldout(val_fraction, split, seed)  # checks the fraction and the split name
    return resolve_shards(spec, "train"), holdout




class ShardStream(IterableDataset):
    """Iterable of batches for one rank; each DataLoader worker streams its own part of the shards."""

    def __init__(self, urls: list[str], *, batch_size: int, image_size: int, seed: int, rank: int,
                 world_size: int, shuffle_buffer: int, batches_per_epoch: int | None, caption: str,
                 flip: bool, epoch: int, latents: bool = False, holdout: KeyHoldout | None = None,
                 text: bool = False) -> None:
        super().__init__()
        self.latents, self.holdout, self.text = latents, holdout, text
        self.urls, self.batch_size, self.image_size = list(urls), batch_size, image_size
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, epoch
        self.shuffle_buffer, self.batches_per_epoch = shuffle_buffer, batches_per_epoch
        self.caption, self.flip = caption, flip
        self.skips = SkipCounter(max_empty_shards=max(50, 3 * len(self.urls)), shards=len(set(self.urls)))
        self.worker = 0

    def _shards(self, worker: int, num_workers: int, rng: random.Random, epoch: int) -> Iterator[dict]:
        """Shard URLs for this rank and worker: a shuffled split, or an endless resample."""
        order = list(self.urls)
        random.Random(f"shards:{self.seed}:{epoch}").shuffle(order)  # same order on every rank
        mine = order[self.rank::self.world_size]  # the explicit node splitter
        if self.batches_per_epoch is None:
            for url in mine[worker::num_workers]:
                yield {"url": url}
        else:
            pool = mine or order  # fewer shards than ranks: every rank samples from all of them
            while True:
                yield {"url": rng.choice(pool)}

    def _decode(self, sample: dict, rng: random.Random) -> Decoded:
        return decode_sample(sample, rng, width=self.image_size, height=self.image_size, caption=self.caption,
                             text=self.text, latents=self.latents, flip=self.flip)

    def _batches(self, samples: Iterable[dict], rng: random.Random) -> Iterator[dict]:
        """Decode samples into batches of batch_size; a final partial batch only in one-pass mode."""
        decoded: list[Decoded] = []
        for sample in samples:
            try:
                decoded.append(self._decode(sample, rng))
            except Exception as exn:  # a bad sample must never kill the stream
                self.skips.skip(f"sample {sample.get('__key__')!r} in {sample.get('__url__')}", exn)
                continue
            if len(decoded) == self.batch_size:
                yield self._collate(decoded)
                decoded = []
        if decoded and self.batches_per_epoch is None:
            yield self._collate(decoded)

    def _collate(self, decoded: list[Decoded]) -> dict:
        return collate(decoded, latents=self.latents, skipped=self.skips.count, worker=self.worker)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self.worker = worker  # batches say which worker's skip count they carry (counts are per worker)
        epoch = self.epoch
        if info is not None:
            self.epoch += 1  # a worker's copy: a persistent worker streams the next epoch on its next pass
        rng = random.Random(f"samples:{self.seed}:{epoch}:{self.rank}:{worker}")
        shards = self._shards(worker, num_workers, rng, epoch)
        files = tar_file_expander(open_shards(shards, self.skips), handler=self.skips.handler)
        samples = self.skips.got_samples(group_by_keys(files, handler=self.skips.handler))
        if self.holdout is not None:
            samples = (s for s in samples if self.holdout.keeps(s["__key__"]))  # this split's part of the shards
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        batches = self._batches(samples, rng)
        if self.batches_per_epoch is not None:
            # the epoch is a number of batches: split it exactly over the workers of this rank
            n = self.batches_per_epoch // num_workers + (worker < self.batches_per_epoch % num_workers)
            batches = itertools.islice(batches, n)
        yield from batches


class ShardLoader:
    """Re-iterable batch stream; each full iteration advances the epoch (set it with set_epoch).

    With workers, ``prefetch_factor`` batches per worker are prepared ahead; ``pin_memory`` puts batches in
    page-locked memory (for non-blocking copies to a GPU); with ``persistent_workers`` the workers of an epoch that
    ran to its end stream the next one too (each worker's copy of the stream advances its own epoch), instead of
    new workers starting every epoch.
    """

    def __init__(self, stream: ShardStream, num_workers: int, pin_memory: bool = False, prefetch_factor: int = 2,
                 persistent_workers: bool = False) -> None:
        self.stream, self.num_workers, self.pin_memory = stream, num_workers, pin_memory
        self.prefetch_factor, self.persistent_workers = prefetch_factor, persistent_workers
        self._kept: tuple[int, DataLoader] | None = None  # (the epoch it streams next, a persistent DataLoader)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch that seeds the next iteration."""
        self.stream.epoch = epoch

    def __len__(self) -> int:
        if self.stream.batches_per_epoch is None:
            raise TypeError("a one-pass stream has no known length")
        return self.stream.batches_per_epoch

    def _workers(self) -> DataLoader:
        """The DataLoader of this epoch: the persistent one when it continues here, else new workers, each with a
        copy of the stream at this epoch."""
        kept, self._kept = self._kept, None  # kept again only when this epoch runs to its end
        if kept is not None and kept[0] == self.stream.epoch:
            return kept[1]
        return DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                          prefetch_factor=self.prefetch_factor, persistent_workers=self.persistent_workers)

    def __iter__(self) -> Iterator[dict]:
        if self.num_workers > 0:
            loader = self._workers()
            yield from loader
            if self.persistent_workers:
                self._kept = (self.stream.epoch + 1, loader)
        else:
            yield from (pin(b) for b in self.stream) if self.pin_memory else self.stream
        self.stream.epoch += 1


def pin(batch: dict) -> dict:
    """A batch with its tensors in page-locked memory (what DataLoader's pin_memory does for worker batches)."""
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def make_loader(urls: list[str], *, batch_size: int, image_size: int, seed: int = 0,
                rank: int = 0, world_size: int = 1, num_workers: int = 0,
                shuffle_buffer: int = 1000, batches_per_epoch: int | None = None,
                caption: str = "label", flip: bool = False, epoch: int = 0, latents: bool = False,
                holdout: KeyHoldout | None = None, text: bool = False, pin_memory: bool = False,
                prefetch_factor: int = 2, persistent_workers: bool = False) -> Iterable[dict]:
    """Batches {image (B, 3, H, W) in [-1, 1], caption, key, skipped, worker} from WebDataset shard URLs.

    ``skipped`` counts the bad samples skipped so far by the DataLoader worker ``worker`` that made the batch.

    With ``latents=True`` the shards are pre-encoded latent shards and batches hold ``latent`` (B, C, h, w).
    With a ``holdout`` only the samples of its part (held-out keys for "val", the others for "train") come out.
    With ``text=True`` the shards hold cached text embeddings (``ldm.data.text_cache``): each sample's caption is
    one of its cached captions and the batch carries its ``context``, ``context_mask`` and ``pooled``.
    ``pin_memory`` (only where CUDA is), ``prefetch_factor`` and ``persistent_workers``: see ``ShardLoader``; none of
    them changes a batch.
    """
    if isinstance(urls, str):
        urls = resolve_shards(urls)
    if not urls:
        raise ValueError("make_loader needs at least one shard URL")
    if caption not in CAPTION_MODES:
        raise ValueError(f"caption must be one of {CAPTION_MODES}, got {caption!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch_size < 1 or image_size < 1 or num_workers < 0:
        raise ValueError(f"bad batch_size={batch_size}, image_size={image_size} or num_workers={num_workers}")
    if batches_per_epoch is None and len(urls) < world_size:
        raise ValueError(f"one-pass mode needs at least one shard per rank: {len(urls)} shards, "
                         f"{world_size} ranks; pass batches_per_epoch to resample instead")
    if batches_per_epoch is not None and batches_per_epoch < 1:
        raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
    stream = ShardStream(urls, batch_size=batch_size, image_size=image_size, seed=seed, rank=rank,
                         world_size=world_size, shuffle_buffer=shuffle_buffer,
                         batches_per_epoch=batches_per_epoch, caption=caption, flip=flip, epoch=epoch,
                         latents=latents, holdout=holdout, text=text)
    return ShardLoader(stream, num_workers, pin_memory, prefetch_factor, persistent_workers and num_workers > 0)
