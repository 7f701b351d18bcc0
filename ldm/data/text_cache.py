"""Text embeddings cached in shards: each caption's token embeddings, mask and pooled vector computed once.

``encode_text_shards`` copies every sample of a data set (image or latent shards) and adds, for each of its
captions, the frozen text encoder's output:

    text.json         {"captions": [K strings]}  (K captions per sample: one embedding each)
    text_context.npy  (K, L, D) in the recorded dtype (float32, float16, or bfloat16 stored as its uint16 bits)
    text_mask.npy     (K, L) bool
    text_pooled.npy   (K, P), when the encoder gives a pooled vector

index.json keeps the source's splits and ``latents`` section and adds ``text``: the encoder's fingerprint
(weights, tokenizer, settings), dtype and shapes; ``null_condition.safetensors`` beside it holds the null
condition (float32) so training needs no text encoder at all. ``check_text_cache`` refuses a cache made by
another encoder, naming both fingerprints. The stream reads it with ``make_loader(..., text=True)``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ldm.data.decode import from_npy, pick_caption
from ldm.data.shards import INDEX_NAME, check_cache_index
from ldm.data.skips import raw_samples
from ldm.data.stream import has_splits, resolve_split
from ldm.io import atomic_write_bytes

NULL_NAME = "null_condition.safetensors"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
__all__ = ["check_text_cache", "encode_text_shards", "from_npy", "load_cached_null_condition", "to_npy"]

Encode = Callable[[list[str]], dict[str, torch.Tensor]]  # prompts -> {"context", "context_mask"[, "pooled"]}


def to_npy(tensor: torch.Tensor, dtype: str) -> bytes:
    """.npy bytes of a tensor in a recorded dtype (bfloat16 as its raw uint16 bits: numpy has no bfloat16)."""
    t = tensor.detach().to("cpu", DTYPES[dtype]).contiguous()
    array = t.view(torch.uint16).numpy() if dtype == "bfloat16" else t.numpy()
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _batched(samples: Iterable[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_shard(samples: Iterable[dict], path: Path) -> int:
    """Write samples to one tar shard through a temp name (a crash never leaves half a shard); returns the count."""
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with open(tmp, "wb") as file:
        with wds.TarWriter(file, mtime=0) as writer:  # fixed mtime: identical inputs give identical shards
            for sample in samples:
                writer.write(sample)
                count += 1
    os.replace(tmp, path)
    return count


def encode_text_shards(data: str, out_dir: str | Path, encode: Encode, *, fingerprint: str,
                       null_cond: dict[str, torch.Tensor], dtype: str = "float32", batch_size: int = 64,
                       splits: tuple[str, ...] = ("train", "val"), caption: str = "label",
                       captions: Callable[[dict], list[str]] | None = None, progress: bool = True,
                       val_fraction: float = 0.0, val_seed: int = 0) -> dict:
    """Copy the samples of data's splits into out_dir with each caption's embeddings added; returns the index.

    Each input shard becomes one output shard with the same samples in the same order, so a stream over the
    cache sees exactly the sequence (shuffles included) of a stream over the input. ``captions(raw_sample)``
    lists a sample's captions (default: the one ``pick_caption(sample, caption)`` gives); samples without a
    caption are dropped and counted in the index's ``text.skipped``. A data set without splits (a plain shard
    folder) is one split: all of it is the cache's train split, or, with ``val_fraction``, the part a key hash
    keeps (``resolve_split``), the held-out part its val split.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    captions_of = captions or (lambda sample: [pick_caption(sample, caption)])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(data) / INDEX_NAME if Path(data).is_dir() else Path(data)
    source_index = json.loads(source.read_text()) if source.is_file() and source.suffix == ".json" else {}
    index: dict = {k: v for k, v in source_index.items() if k not in ("splits", "text")}
    text = {"fingerprint": fingerprint, "dtype": dtype, "caption": caption, "source": str(data), "skipped": 0,
            "null": NULL_NAME}
    index.update(splits={}, text=text)

    def with_text(batch: list[dict]) -> Iterator[dict]:
        kept, texts = [], []
        for sample in batch:
            try:
                caps = [c for c in captions_of(sample) if c]
            except ValueError:  # missing or empty caption
                caps = []
            if caps:
                kept.append(sample)
                texts.append(caps)
            else:
                text["skipped"] += 1
        if not kept:
            return
        cond = encode([c for caps in texts for c in caps])  # (N, L, D), (N, L)[, (N, P)]
        text.update(max_length=int(cond["context"].shape[1]), dim=int(cond["context"].shape[2]),
                    pooled_dim=int(cond["pooled"].shape[1]) if "pooled" in cond else None)
        start = 0
        for sample, caps in zip(kept, texts):
            part = slice(start, start + len(caps))
            start += len(caps)
            out_sample = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
            out_sample["text.json"] = json.dumps({"captions": caps, "dtype": dtype}, ensure_ascii=False).encode()
            out_sample["text_context.npy"] = to_npy(cond["context"][part], dtype)  # (K, L, D)
            out_sample["text_mask.npy"] = _bool_npy(cond["context_mask"][part])  # (K, L)
            if "pooled" in cond:
                out_sample["text_pooled.npy"] = to_npy(cond["pooled"][part], dtype)  # (K, P)
            yield out_sample

    one_split = not has_splits(data) and not val_fraction
    for split in splits:
        try:
            urls, holdout = resolve_split(data, split, val_fraction, val_seed)
        except ValueError:
            continue  # e.g. no validation split
        if one_split and split != splits[0]:
            continue  # a plain folder is one split: it is not copied twice
        names, counts = [], []
        for url in tqdm(urls, desc=f"text {split}", unit="shard", disable=not progress):
            names.append(f"{split}-{len(names):06d}.tar")
            raw = (s for s in raw_samples([url]) if holdout is None or holdout.keeps(s["__key__"]))
            samples = (s for batch in _batched(raw, batch_size) for s in with_text(batch))
            counts.append(_write_shard(samples, out / names[-1]))
        index["splits"][split] = {"shards": names, "counts": counts, "total": sum(counts)}
    null = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
            for k, v in null_cond.items()}
    save_file(null, str(out / (NULL_NAME + ".tmp")), metadata={"fingerprint": fingerprint})
    os.replace(out / (NULL_NAME + ".tmp"), out / NULL_NAME)
    atomic_write_bytes(out / INDEX_NAME, json.dumps(index, indent=2).encode("utf-8"))  # last: the cache is complete
    return index


def _bool_npy(mask: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, mask.detach().to("cpu").bool().numpy())
    return buf.getvalue()


def check_text_cache(spec: str, fingerprint: str) -> dict:
    """The cache's ``text`` section; ValueError naming both fingerprints when another encoder made it."""
    return check_cache_index(spec, "text", "fingerprint", fingerprint, "text embedding cache",
                             "re-encode the captions")


def load_cached_null_condition(spec: str) -> dict[str, torch.Tensor]:
    """The null condition stored with a text cache (float32 features, bool mask[, pooled]), each (1, ...)."""
    folder = Path(spec) if Path(spec).is_dir() else Path(spec).parent
    path = folder / NULL_NAME
    if not path.is_file():
        raise ValueError(f"text embedding cache {spec}: no {NULL_NAME}")
    return load_file(str(path))
