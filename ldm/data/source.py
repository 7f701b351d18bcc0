"""Where a run's training and held-out samples come from, by the data section: the shards streamed, what they hold
(images or latents; cached text embeddings or captions) and, for a data set without splits, which part of it. This is
the one place that picks a run's shards; ``run_stream`` turns them into streams, ``ldm.assemble.checks`` checks them.

    data.text_cache   cached text embeddings (over image or latent shards): streamed first
    data.latents      pre-encoded latent shards
    data.train        image shards: a folder with index.json, a folder of *.tar (img2dataset), a URL pattern

``data.val_fraction`` (with ``data.val_seed``) holds out that part of a data set without splits by a stable hash of
each sample's key; the held-out part is the validation split (``data.val``, or ``data.train`` when that is None).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ldm.config import DataConfig
from ldm.data.split import KeyHoldout
from ldm.data.stream import has_split, has_splits


@dataclass(frozen=True)
class Source:
    """A split's shards: the spec to resolve, the config key that named it, what its samples hold, its key part."""

    spec: str
    key: str
    latents: bool = False  # samples hold latents (npy), not images
    text: bool = False  # samples hold cached text embeddings
    holdout: KeyHoldout | None = None  # the part of the shards this split keeps (a data set without splits)


def _holdout(data: DataConfig, spec: str, split: str) -> KeyHoldout | None:
    if not data.val_fraction or has_splits(spec):
        return None
    return KeyHoldout(data.val_fraction, split, data.val_seed)


def cache_holds_latents(spec: str) -> bool:
    """True when a cache's index.json records latents (a text cache made over latent shards)."""
    path = Path(spec)
    path = path / "index.json" if path.is_dir() else path
    try:
        return "latents" in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def train_source(data: DataConfig) -> Source:
    """The training stream's shards."""
    if data.text_cache is not None:
        return Source(data.text_cache, "data.text_cache", cache_holds_latents(data.text_cache), True,
                      _holdout(data, data.text_cache, "train"))
    if data.latents is not None:
        return Source(data.latents, "data.latents", True, False, _holdout(data, data.latents, "train"))
    return Source(data.train, "data.train", holdout=_holdout(data, data.train, "train"))


def val_source(data: DataConfig) -> Source | None:
    """The held-out split's shards (image shards), or None when the data section has none."""
    spec = data.val if data.val is not None else (data.train if data.val_fraction else None)
    if spec is None:
        return None
    return Source(spec, "data.val", holdout=_holdout(data, spec, "val"))


def held_out_source(data: DataConfig) -> Source | None:
    """The held-out loss's samples: a text cache's own val split when it has one (the held-out captions' cached
    embeddings: no text encoder needed), else the held-out image shards (``val_source``)."""
    cache = data.text_cache
    if cache is not None and has_split(cache, "val"):
        return Source(cache, "data.text_cache", cache_holds_latents(cache), True)
    return val_source(data)
