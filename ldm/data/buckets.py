"""Aspect-ratio buckets (NovelAI 2022; SDXL, Podell et al. 2023, Sec. 2.3): train on images of many shapes without
cropping them square, every global batch of one shape.

* Sizes: (width, height) pairs of about base^2 pixels, given or derived from the base size in steps of ``multiple``
  up to ``max_ratio``; each image goes to the size nearest its aspect ratio (in log ratio) and is resized to cover it
  with the least crop (``ldm.data.decode``; the crop corner and original size are SDXL's micro-conditions).
* The manifest: every sample's key, shard, member offsets and image size, from the tar and image headers (no image is
  decoded), cached per shard under ``$LDM_CACHE/buckets`` keyed by path, size and modification time. A sample
  without a readable image is skipped there and counted.
* The epoch plan is a pure function of (manifest, seed, epoch, global batch G = processes x accumulation x micro-batch):
  each bucket's samples are shuffled and cut into global batches of G; what is left of each bucket (fewer than G) is
  pooled, N mod G of the pool (drawn anew each epoch) wait for the next epoch, the rest is sorted by aspect ratio and
  cut into global batches trained at the bucket nearest their mean ratio; then the global batches are shuffled. So an
  epoch is floor(N / G) global batches, each of one size, and trains every sample once except those N mod G.
* Rank r's micro-batch a of global batch g holds its rows [(a W + r) b, (a W + r + 1) b): every rank and accumulation
  micro-step of a step gets the same shape, and no rank waits on another's.
* The stream reads micro-batch i of this rank's plan by offset from the local shard files (a map-style dataset, so any
  DataLoader worker reads any micro-batch and the order is kept); a resumed run starts at its position directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import tarfile
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from ldm.data.decode import IMAGE_EXTENSIONS, collate, decode_sample
from ldm.data.split import KeyHoldout
from ldm.io import atomic_write_bytes, cache_dir

log = logging.getLogger(__name__)
Size = tuple[int, int]  # (width, height)
SCAN_FORMAT = 1


def bucket_sizes(sizes: Sequence[Sequence[int]] | None, base: int, multiple: int = 64,
                 max_ratio: float = 2.0) -> list[Size]:
    """The buckets as (width, height), by increasing aspect ratio: the given ones, or sides that are multiples of
    ``multiple`` with the largest height for each width that keeps width x height <= base^2 (and its transpose), up to
    ``max_ratio`` either way; the square base size is one of them when base is a multiple."""
    if sizes:
        return sorted({(int(w), int(h)) for w, h in sizes}, key=lambda s: (s[0] / s[1], s[0]))
    area, found = base * base, set()
    square = base // multiple * multiple
    if square < multiple:
        raise ValueError(f"data.buckets.multiple={multiple} is larger than the base size {base}")
    found.add((square, square))
    w = square + multiple
    while True:
        h = area // w // multiple * multiple
        if h < multiple or w / h > max_ratio:
            break
        found |= {(w, h), (h, w)}
        w += multiple
    return sorted(found, key=lambda s: (s[0] / s[1], s[0]))


def nearest_bucket(sizes: Sequence[Size], log_ratio: float) -> int:
    """Index of the size whose log(width / height) is nearest (the first of a tie)."""
    return min(range(len(sizes)), key=lambda i: abs(math.log(sizes[i][0] / sizes[i][1]) - log_ratio))


# --- the manifest ----------------------------------------------------------------------------------------
def scan_shard(path: str) -> dict:
    """{"samples": [[key, {ext: [offset, size]}, width, height], ...], "skipped": n} of one tar shard, read from the
    tar headers and each image's header; samples are grouped as webdataset's group_by_keys groups them."""
    samples, skipped = [], 0
    current: list | None = None

    def finish(tar: tarfile.TarFile) -> None:
        nonlocal skipped
        if current is None:
            return
        key, members = current
        ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        try:
            if ext is None:
                raise ValueError("no image")
            offset, size = members[ext]
            tar.fileobj.seek(offset)
            with Image.open(_Window(tar.fileobj, offset, size)) as image:
                width, height = image.size
            samples.append([key, members, int(width), int(height)])
        except Exception as exn:  # PIL raises many types for bad bytes
            skipped += 1
            log.warning("buckets: skipping sample %r in %s: %s", key, path, exn)

    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                base, ext = base_plus_ext(member.name) if member.isfile() else (None, None)
                if base is None or (base.startswith("__") and "/" not in base):
                    continue
                if current is None or base != current[0] or ext in current[1]:
                    finish(tar)
                    current = [base, {}]
                current[1][ext] = [member.offset_data, member.size]
            finish(tar)
    except (tarfile.TarError, OSError) as exn:
        skipped += 1
        log.warning("buckets: shard %s is unreadable after %d samples: %s", path, len(samples), exn)
    return {"samples": samples, "skipped": skipped}


class _Window:
    """A read-only file view of bytes [offset, offset + size) of an open file (PIL reads only the header)."""

    def __init__(self, file, offset: int, size: int):
        self.file, self.offset, self.size, self.pos = file, offset, size, 0

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        self.file.seek(self.offset + self.pos)
        data = self.file.read(n)
        self.pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, min(self.size, {0: pos, 1: self.pos + pos, 2: self.size + pos}[whence]))
        return self.pos

    def tell(self) -> int:
        return self.pos


_scans: dict[str, dict] = {}  # per process: cache file name -> scan


def cached_scan(path: str) -> dict:
    """scan_shard's result, from memory, from $LDM_CACHE/buckets, or scanned now (and stored there)."""
    stat = os.stat(path)
    ident = f"{SCAN_FORMAT}:{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"
    name = hashlib.sha256(ident.encode()).hexdigest()[:32] + ".json"
    if name not in _scans:
        file = cache_dir("buckets") / name
        try:
            _scans[name] = json.loads(file.read_text())
        except (OSError, ValueError):
            _scans[name] = scan_shard(path)
            try:
                file.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(file, json.dumps(_scans[name]).encode())
            except OSError as exn:  # a read-only cache only costs a rescan next time
                log.warning("buckets: cannot cache the scan of %s: %s", path, exn)
    return _scans[name]


@dataclass
class Manifest:
    """The samples of local shards, in shard and tar order: key, shard, member offsets, image (width, height)."""

    urls: list[str]
    keys: list[str] = field(default_factory=list)
    shard: list[int] = field(default_factory=list)
    members: list[dict[str, list[int]]] = field(default_factory=list)
    sizes: list[Size] = field(default_factory=list)
    skipped: int = 0  # samples without a readable image (and unreadable shard tails)

    def read(self, i: int, files: dict[int, object]) -> dict:
        """Sample i's raw fields (bytes per extension, and __key__), read by offset; ``files`` keeps shards open."""
        s = self.shard[i]
        if s not in files:
            files[s] = open(self.urls[s], "rb")
        f, sample = files[s], {"__key__": self.keys[i], "__url__": self.urls[s]}
        for ext, (offset, size) in self.members[i].items():
            f.seek(offset)
            sample[ext] = f.read(size)
        return sample


def build_manifest(urls: Sequence[str], holdout: KeyHoldout | None = None) -> Manifest:
    """The manifest of local shards (the holdout's part only, with one)."""
    manifest = Manifest(list(urls))
    for s, url in enumerate(manifest.urls):
        scan = cached_scan(url)
        manifest.skipped += scan["skipped"]
        for key, members, width, height in scan["samples"]:
            if holdout is None or holdout.keeps(key):
                manifest.keys.append(key)
                manifest.shard.append(s)
                manifest.members.append(members)
                manifest.sizes.append((width, height))
    return manifest


# --- the epoch plan --------------------------------------------------------------------------------------
def assign(manifest: Manifest, sizes: Sequence[Size]) -> list[int]:
    """Each sample's bucket: the size nearest its image's aspect ratio."""
    return [nearest_bucket(sizes, math.log(w / h)) for w, h in manifest.sizes]


def epoch_plan(bucket_of: Sequence[int], log_ratios: Sequence[float], sizes: Sequence[Size], global_batch: int,
               seed: int, epoch: int) -> list[tuple[int, list[int]]]:
    """The epoch's global batches as (bucket, sample indices): floor(N / G) of them, each of one bucket (see above)."""
    rng = random.Random(f"buckets:{seed}:{epoch}")
    members: dict[int, list[int]] = defaultdict(list)
    for i, b in enumerate(bucket_of):
        members[b].append(i)
    batches, rest = [], []
    for b in sorted(members):
        idx = members[b]
        rng.shuffle(idx)
        full = len(idx) // global_batch * global_batch
        batches += [(b, idx[j:j + global_batch]) for j in range(0, full, global_batch)]
        rest += idx[full:]
    rng.shuffle(rest)
    rest = sorted(rest[len(rest) % global_batch:], key=lambda i: (log_ratios[i], i))  # the N mod G wait
    for j in range(0, len(rest), global_batch):
        chunk = rest[j:j + global_batch]
        batches.append((nearest_bucket(sizes, sum(log_ratios[i] for i in chunk) / len(chunk)), chunk))
    rng.shuffle(batches)
    return batches


def rank_rows(plan: Sequence[tuple[int, list[int]]], rank: int, world_size: int, grad_accum: int,
              batch_size: int) -> list[tuple[int, list[int]]]:
    """This rank's micro-batches of the plan, in order: grad_accum per global batch, rows [(a W + r) b, ... + b)."""
    rows = []
    for bucket, idx in plan:
        for a in range(grad_accum):
            start = (a * world_size + rank) * batch_size
            rows.append((bucket, idx[start:start + batch_size]))
    return rows


def plan_report(bucket_of: Sequence[int], sizes: Sequence[Size], global_batch: int, skipped: int) -> list[str]:
    """What the plan does with this data set: per bucket its images, and the images not trained in their own bucket
    (under-filled buckets) or waiting each epoch; nothing is dropped silently."""
    n, counts = len(bucket_of), Counter(bucket_of)
    lines = [f"buckets: {n} images in {len(counts)} of {len(sizes)} sizes, global batches of {global_batch}: "
             f"{n // global_batch} steps per epoch; {n % global_batch} images (another draw each epoch) wait for "
             f"the next epoch; {skipped} samples without a readable image skipped"]
    spilled = 0
    for b, (w, h) in enumerate(sizes):
        rest = counts[b] % global_batch
        spilled += rest
        if counts[b]:
            full = counts[b] // global_batch
            note = f", {rest} trained with other buckets' remainders at the nearest size" if rest else ""
            under = " (under-filled: fewer than a global batch)" if not full else ""
            lines.append(f"  {w}x{h}: {counts[b]} images, {full} global batches{note}{under}")
    lines.append(f"buckets: {spilled} images per epoch train outside their own bucket, as remainders")
    return lines


# --- the stream ------------------------------------------------------------------------------------------
class BucketBatches(Dataset):
    """Micro-batch i of this rank's plan: its samples read by offset, resized to the bucket, collated."""

    def __init__(self, manifest: Manifest, rows: list[tuple[int, list[int]]], sizes: Sequence[Size], *, seed: int,
                 epoch: int, caption: str, text: bool, flip: bool, skipped: int = 0):
        self.manifest, self.rows, self.sizes = manifest, rows, list(sizes)
        self.seed, self.epoch, self.caption, self.text, self.flip = seed, epoch, caption, text, flip
        self.skipped = skipped  # this copy's count (each DataLoader worker has its own)
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        if self._pid != os.getpid():  # a forked worker: its own file handles
            self._files, self._pid = {}, os.getpid()
        bucket, idx = self.rows[i]
        width, height = self.sizes[bucket]
        decoded = []
        for j in idx:
            key = self.manifest.keys[j]
            rng = random.Random(f"sample:{self.seed}:{self.epoch}:{key}")  # the same on any worker layout
            try:
                sample = self.manifest.read(j, self._files)
                decoded.append(decode_sample(sample, rng, width=width, height=height, caption=self.caption,
                                             text=self.text, flip=self.flip))
            except Exception as exn:  # a bad sample must never kill the stream
                self.skipped += 1
                log.warning("skipping bad sample %r in %s (%d skipped so far): %s", key,
                            self.manifest.urls[self.manifest.shard[j]], self.skipped, exn)
        if not decoded:
            from ldm.data.skips import NoUsableData

            raise NoUsableData(f"no sample of micro-batch {i} ({len(idx)} samples) can be read")
        decoded += [decoded[k % len(decoded)] for k in range(len(idx) - len(decoded))]  # keep the batch size
        info = get_worker_info()
        return collate(decoded, latents=False, skipped=self.skipped, worker=info.id if info is not None else 0)


def bucket_batches(manifest: Manifest, sizes: Sequence[Size], bucket_of: Sequence[int], *, batch_size: int, rank: int,
                   world_size: int, grad_accum: int, seed: int, epoch: int, start: int = 0, num_workers: int = 0,
                   caption: str = "label", text: bool = False, flip: bool = False) -> Iterator[dict]:
    """This rank's micro-batches of an epoch from micro-batch ``start`` on (see the module docstring)."""
    ratios = [math.log(w / h) for w, h in manifest.sizes]
    plan = epoch_plan(bucket_of, ratios, sizes, batch_size * world_size * grad_accum, seed, epoch)
    rows = rank_rows(plan, rank, world_size, grad_accum, batch_size)
    dataset = BucketBatches(manifest, rows, sizes, seed=seed, epoch=epoch, caption=caption, text=text, flip=flip,
                            skipped=manifest.skipped if rank == 0 else 0)
    if num_workers == 0:
        yield from (dataset[i] for i in range(start, len(rows)))
    else:
        yield from DataLoader(dataset, batch_size=None, sampler=range(start, len(rows)), num_workers=num_workers)
