"""Real images for evaluation: read from shards, turned into features once, cached under a hash of what they
depend on.

* The reference set is a held-out split (``val``): its Inception features (for FID/KID), captions (the prompts)
  and ``subcategory`` labels (for the probe), cached as ``<cache>/<key>/reference.safetensors`` + ``.json`` with
  key = hash(content of every shard file, image size, caption mode, the Inception file's hash).
* The probe is fitted once on training images of the reference set's subcategories (at most ``per_class`` distinct
  emoji per class and style) and cached beside it as ``probe-<key>.safetensors``, key = hash(training shards,
  per_class, weight decay).

Images are decoded exactly as the training stream decodes them (``to_rgb`` + ``resize_center_crop``) at the
model's image size, so real and generated images reach the Inception network through the same steps.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ldm.data.stream import pick_caption, resize_center_crop, resolve_shards, to_rgb
from ldm.eval.inception import InceptionFeatures, file_hash
from ldm.eval.probe import LinearProbe, fit_probe

log = logging.getLogger(__name__)
LABEL_KEY = "subcategory"


@dataclass
class RealSet:
    """Real samples of one split: (N, 3, H, W) uint8 images or (N, D) features, with captions and labels."""

    captions: list[str]
    labels: list[str]  # the json's subcategory ("" when absent)
    keys: list[str]
    images: torch.Tensor | None = None  # (N, 3, H, W) uint8
    features: torch.Tensor | None = None  # (N, D) float64

    def __len__(self) -> int:
        return len(self.keys)


def default_cache_dir() -> Path:
    """`$LDM_CACHE/eval`, else `~/.cache/ldm/eval` (the npm cache's sibling)."""
    root = os.environ.get("LDM_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "ldm") / "eval"


def shards_hash(urls: list[str]) -> str:
    """sha256 over the content of each local shard file, in order (remote URLs contribute their URL)."""
    h = hashlib.sha256()
    for url in urls:
        path = Path(url)
        h.update((file_hash(path) if path.is_file() else f"url:{url}").encode())
    return h.hexdigest()


def _key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def iter_samples(urls: list[str]) -> Iterator[tuple[dict, dict]]:
    """(raw sample, parsed json metadata) of every sample of the shards, in shard order."""
    import webdataset as wds

    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    for sample in dataset:
        meta = json.loads(sample["json"]) if "json" in sample else {}
        yield sample, meta


def read_split(spec: str, split: str, image_size: int, caption: str = "label",
               keep: Callable[[dict], bool] | None = None, progress: bool = True) -> RealSet:
    """Decode the samples of a split (those whose metadata ``keep`` accepts) to uint8 images at image_size."""
    urls = resolve_shards(spec, split)
    images, captions, labels, keys = [], [], [], []
    for sample, meta in tqdm(iter_samples(urls), desc=f"reading {split}", unit="img", disable=not progress,
                             leave=False):
        if keep is not None and not keep(meta):
            continue
        ext = next((e for e in ("png", "jpg", "jpeg", "webp") if e in sample), None)
        if ext is None:
            log.warning("skipping sample %s without an image", sample.get("__key__"))
            continue
        with Image.open(io.BytesIO(sample[ext])) as image:
            image.load()
            rgb = resize_center_crop(to_rgb(image), image_size)
        images.append(torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1))  # (3, H, W)
        captions.append(pick_caption(sample, caption))
        labels.append(str(meta.get(LABEL_KEY, "")))
        keys.append(sample["__key__"])
    if not keys:
        raise ValueError(f"{spec}: split {split!r} has no usable samples")
    return RealSet(captions, labels, keys, images=torch.stack(images))


def features_of(real: RealSet, inception: InceptionFeatures, progress: bool = True,
                desc: str = "inception") -> torch.Tensor:
    return inception.features(real.images.float() / 255, desc=desc, progress=progress)  # (N, D)


def _save(folder: Path, name: str, real: RealSet, extra: dict | None = None) -> None:
    """Write <name>.safetensors (features) and <name>.json (captions, labels, keys), each by a rename."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"captions": real.captions, "labels": real.labels, "keys": real.keys, **(extra or {})}
    tensors, text = folder / f".{name}.safetensors.tmp{os.getpid()}", folder / f".{name}.json.tmp{os.getpid()}"
    save_file({"features": real.features.contiguous()}, str(tensors))
    text.write_text(json.dumps(meta))
    os.replace(text, folder / f"{name}.json")
    os.replace(tensors, folder / f"{name}.safetensors")


def _load(folder: Path, name: str) -> RealSet | None:
    if not (folder / f"{name}.safetensors").is_file() or not (folder / f"{name}.json").is_file():
        return None
    meta = json.loads((folder / f"{name}.json").read_text())
    features = load_file(str(folder / f"{name}.safetensors"))["features"]
    return RealSet(meta["captions"], meta["labels"], meta["keys"], features=features)


def reference_folder(spec: str, split: str, image_size: int, caption: str, inception: InceptionFeatures,
                     cache_dir: str | Path | None = None) -> Path:
    """The cache folder of a held-out split's reference statistics (and of the probes fitted for it)."""
    key = _key(kind="reference", shards=shards_hash(resolve_shards(spec, split)), image_size=image_size,
               caption=caption, inception=inception.hash)
    return Path(cache_dir or default_cache_dir()) / key


def load_reference(spec: str, split: str, image_size: int, caption: str, inception: InceptionFeatures,
                   cache_dir: str | Path | None = None, progress: bool = True) -> tuple[RealSet, Path]:
    """Features, captions and labels of a held-out split: from the cache, else computed and cached."""
    folder = reference_folder(spec, split, image_size, caption, inception, cache_dir)
    real = _load(folder, "reference")
    if real is None:
        real = read_split(spec, split, image_size, caption, progress=progress)
        real.features = features_of(real, inception, progress, desc=f"inception ({split} reference)")
        _save(folder, "reference", real, {"spec": str(spec), "split": split, "image_size": image_size})
        real.images = None
    return real, folder


def load_probe(folder: Path, spec: str, classes: list[str], image_size: int, inception: InceptionFeatures,
               per_class: int = 16, weight_decay: float = 1e-2, progress: bool = True) -> LinearProbe:
    """A probe over ``classes`` fitted on the training split of ``spec``: from the cache folder, else fitted there."""
    urls = resolve_shards(spec, "train")
    key = _key(kind="probe", shards=shards_hash(urls), classes=sorted(classes), per_class=per_class,
               weight_decay=weight_decay)
    path = folder / f"probe-{key}.safetensors"
    if path.is_file():
        return LinearProbe.load(path)
    wanted, taken, seen = set(classes), {}, set()

    def keep(meta: dict) -> bool:
        """At most per_class distinct emoji (skin-tone variants share a base) per class and style."""
        label, style = meta.get(LABEL_KEY), meta.get("style", "")
        group = (meta.get("base") or meta.get("key"), style)
        if label not in wanted or group in seen or taken.get((label, style), 0) >= per_class:
            return False
        seen.add(group)
        taken[(label, style)] = taken.get((label, style), 0) + 1
        return True

    train = read_split(spec, "train", image_size, keep=keep, progress=progress)
    if len(set(train.labels)) < 2:
        raise ValueError(f"{spec}: the training split has images of fewer than 2 of the held-out subcategories "
                         f"({sorted(set(train.labels))}); a probe cannot be fitted (turn the probe off)")
    train.features = features_of(train, inception, progress, desc="inception (probe training images)")
    probe = fit_probe(train.features, train.labels, weight_decay=weight_decay)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    probe.save(tmp)
    os.replace(tmp, path)
    return probe
