"""Real images for evaluation: read from shards once, split into the protocol's sets, cached under a hash of what
they depend on.

The protocol draws three disjoint sets from the real images (the training split of the evaluation data, the
distribution the model is trained to draw), by one seeded permutation:

* the **floor set** F (``num_images``): its captions are the prompts, image i of the generated set G is drawn for
  caption i of F. F itself is scored exactly like G: FID(F, R) is the real-vs-real floor at the same counts, and the
  classifier's accuracy on F (images it never trained on) is the ceiling of text alignment;
* the **reference set** R (``reference_images``): FID and KID compare G (and F) with it;
* the rest C: with R, the classifier's training images (F is never among them).

Images are decoded exactly as the training stream decodes them (``to_rgb`` + ``resize_center_crop``) at the model's
image size, so real and generated images reach every network through the same steps. Cache entries are keyed by
hash(content of every shard, image size, caption mode, the set sizes and seed, and the network's hash).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ldm.data.decode import pick_caption, resize_center_crop, to_rgb
from ldm.data.skips import SkipCounter, raw_samples
from ldm.data.stream import resolve_shards
from ldm.eval.inception import file_hash
from ldm.io import atomic_write_bytes, cache_dir, load_tensors, save_tensors

log = logging.getLogger(__name__)


@dataclass
class RealSet:
    """Real samples: (N, 3, H, W) uint8 images and/or (N, D) features, with captions, labels and keys."""

    captions: list[str]
    labels: list[str]  # the json metadata's label field ("" when absent)
    keys: list[str]
    images: torch.Tensor | None = None  # (N, 3, H, W) uint8
    features: torch.Tensor | None = None  # (N, D) float64

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, index: list[int]) -> "RealSet":
        pick = torch.tensor(index, dtype=torch.long)
        return RealSet([self.captions[i] for i in index], [self.labels[i] for i in index],
                       [self.keys[i] for i in index], None if self.images is None else self.images[pick],
                       None if self.features is None else self.features[pick])

    def floats(self) -> torch.Tensor:
        """The images as (N, 3, H, W) float in [0, 1]."""
        return self.images.float() / 255


@dataclass
class Split:
    """Indices into a pool: the floor set, the reference set and the rest (see the module docstring)."""

    floor: list[int]
    reference: list[int]
    rest: list[int] = field(default_factory=list)


def default_cache_dir() -> Path:
    """`$LDM_CACHE/eval`, else `~/.cache/ldm/eval` (the npm cache's sibling)."""
    return cache_dir("eval")


def shards_hash(urls: list[str]) -> str:
    """sha256 over the content of each local shard file, in order (remote URLs contribute their URL)."""
    h = hashlib.sha256()
    for url in urls:
        path = Path(url)
        h.update((file_hash(path) if path.is_file() else f"url:{url}").encode())
    return h.hexdigest()


def cache_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def iter_samples(urls: list[str], skips: SkipCounter | None = None) -> Iterator[tuple[dict, dict]]:
    """(raw sample, parsed json metadata) of every sample of the shards, in shard order; unreadable shards are
    skipped and counted in ``skips`` as training skips them (only when none can be read does it stop)."""
    for sample in raw_samples(urls, skips):
        meta = json.loads(sample["json"]) if "json" in sample else {}
        yield sample, meta


def read_split(spec: str, split: str, image_size: int, caption: str = "label", label_key: str = "subcategory",
               limit: int | None = None, progress: bool = True) -> RealSet:
    """Decode up to ``limit`` samples of a split (in shard order) to uint8 images, with captions and labels."""
    urls = resolve_shards(spec, split)
    skips = SkipCounter(max_empty_shards=len(urls) + 1, shards=len(set(urls)))
    images, captions, labels, keys = [], [], [], []
    for sample, meta in tqdm(iter_samples(urls, skips), desc=f"reading {split}", unit="img", disable=not progress,
                             leave=False):
        if limit is not None and len(keys) >= limit:
            break
        ext = next((e for e in ("png", "jpg", "jpeg", "webp") if e in sample), None)
        if ext is None:
            log.warning("skipping sample %s without an image", sample.get("__key__"))
            continue
        try:
            with Image.open(io.BytesIO(sample[ext])) as image:
                image.load()
                rgb = resize_center_crop(to_rgb(image), image_size)
            text = pick_caption(sample, caption)
        except Exception as e:  # noqa: BLE001 - a bad sample is skipped, as the training stream skips it
            log.warning("skipping bad sample %s: %s", sample.get("__key__"), e)
            continue
        images.append(torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1))  # (3, H, W)
        captions.append(text)
        labels.append(str(meta.get(label_key, "")))
        keys.append(sample["__key__"])
    if skips.bad:
        log.warning("%s: %d of %d shards of split %r are unreadable and were skipped, e.g. %s", spec, len(skips.bad),
                    len(urls), split, next(iter(skips.bad)))
    if not keys:
        raise ValueError(f"{spec}: split {split!r} has no usable samples")
    return RealSet(captions, labels, keys, images=torch.stack(images))


def split_pool(n: int, floor: int, reference: int, seed: int) -> Split:
    """A seeded split of n samples into disjoint floor / reference / rest index lists."""
    if floor + reference > n:
        raise ValueError(f"the evaluation needs {floor} + {reference} real images (eval.num_images + "
                         f"eval.reference_images) but the data has {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Split(order[:floor], order[floor:floor + reference], order[floor + reference:])


def save_features(folder: Path, name: str, real: RealSet, extra: dict | None = None) -> None:
    """<name>.safetensors (features) and <name>.json (captions, labels, keys), each written by a rename."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.safetensors.tmp{os.getpid()}"
    save_tensors({"features": real.features}, tmp)
    meta = {"captions": real.captions, "labels": real.labels, "keys": real.keys, **(extra or {})}
    atomic_write_bytes(folder / f"{name}.json", json.dumps(meta).encode())
    os.replace(tmp, folder / f"{name}.safetensors")


def load_features(folder: Path, name: str) -> RealSet | None:
    """A set saved by save_features, or None when it is not (completely) there."""
    tensors, meta = folder / f"{name}.safetensors", folder / f"{name}.json"
    if not tensors.is_file() or not meta.is_file():
        return None
    info = json.loads(meta.read_text())
    return RealSet(info["captions"], info["labels"], info["keys"], features=load_tensors(tensors)["features"])
