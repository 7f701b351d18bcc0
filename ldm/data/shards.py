"""Write WebDataset tar shards (`__key__`, `png`, `txt`, `json` per sample) and an `index.json`.

Each shard is written to `<name>.tmp` and renamed when complete, so a crash never leaves a partial
shard under its final name; `index.json` is replaced the same way, last.
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ldm.data.emoji import DATASOURCE_VERSION, EMOJIBASE, LICENSES, STYLES, EmojiRecord, emoji_records
from ldm.data.decode import resize_center_crop, to_rgb
from ldm.io import atomic_write_bytes

INDEX_NAME = "index.json"


def check_cache_index(spec: str, section: str, key: str, expected: str, kind: str, remedy: str) -> dict:
    """The ``section`` of a cache's index.json; ValueError naming both fingerprints when ``section[key]`` is not
    ``expected`` (the cache was made by another model), or when the folder is not such a cache at all."""
    path = Path(spec)
    path = path / INDEX_NAME if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"{kind} {spec}: no {INDEX_NAME}")
    info = json.loads(path.read_text()).get(section)
    if info is None:
        raise ValueError(f"{kind} {spec}: {INDEX_NAME} has no {section!r} section (not a {kind})")
    if info[key] != expected:
        raise ValueError(f"{kind} {spec} was made by {info[key][:16]}, but the configured one is {expected[:16]}: "
                         f"{remedy}")
    return info


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of a PIL image."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_shards(samples: Iterable[dict], out_dir: str | Path, split: str,
                 samples_per_shard: int = 1000) -> tuple[list[str], list[int]]:
    """Write sample dicts (values bytes or str) to `<split>-%06d.tar` in out_dir; returns (names, counts)."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    counts: list[int] = []
    file = writer = None

    def finish() -> None:
        """Close the open shard and give it its final name."""
        writer.close()
        file.flush()
        os.fsync(file.fileno())
        file.close()
        os.replace(out / (names[-1] + ".tmp"), out / names[-1])

    try:
        for sample in samples:
            if writer is None or counts[-1] >= samples_per_shard:
                if writer is not None:
                    finish()
                names.append(f"{split}-{len(names):06d}.tar")
                counts.append(0)
                file = open(out / (names[-1] + ".tmp"), "wb")
                writer = wds.TarWriter(file, mtime=0)  # fixed mtime: identical inputs give identical shards
            writer.write(sample)
            counts[-1] += 1
        if writer is not None:
            finish()
    except BaseException:
        if file is not None and not file.closed:  # drop the half-written shard; finished ones stay
            writer.close()
            file.close()
            (out / (names[-1] + ".tmp")).unlink(missing_ok=True)
        raise
    return names, counts


def split_groups(groups: Iterable[str], val_fraction: float, seed: int) -> set[str]:
    """Seeded choice of the held-out groups: round(fraction * n), at least one when fraction > 0 and n > 1."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ordered = sorted(set(groups))
    n_val = round(val_fraction * len(ordered))
    if val_fraction > 0 and len(ordered) > 1:
        n_val = min(max(n_val, 1), len(ordered) - 1)
    return set(random.Random(seed).sample(ordered, n_val))


def _emoji_samples(records: list[EmojiRecord], image_size: int, bar: tqdm) -> Iterator[dict]:
    """Encode emoji records as WebDataset samples (RGB on white, resized to image_size)."""
    for rec in records:
        with Image.open(rec.png) as image:
            image.load()
            rgb = resize_center_crop(to_rgb(image), image_size)
        meta = json.dumps(rec.metadata(), ensure_ascii=False, sort_keys=True)
        yield {"__key__": rec.key, "png": encode_png(rgb), "txt": rec.label, "json": meta.encode("utf-8")}
        bar.update(1)


def remove_stale_shards(out: Path, keep: set[str]) -> None:
    """Delete shards (and leftover .tmp files) of earlier builds that the new index does not list."""
    for path in out.glob("*.tar*"):
        if path.name not in keep and (path.suffix == ".tmp" or path.name.split("-")[0] in ("train", "val")):
            path.unlink()


def build_emoji_shards(out_dir: str | Path, image_size: int = 32, samples_per_shard: int = 1000,
                       val_fraction: float = 0.05, seed: int = 0, cache_dir: str | Path | None = None,
                       limit: int | None = None, styles: tuple[str, ...] = STYLES,
                       progress: bool = False) -> dict:
    """Build train/val emoji shards in out_dir and return the index written to `index.json`."""
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    records = [r for r in emoji_records(styles, cache_dir) if r.label]
    codes = sorted({r.code for r in records})
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        keep = set(random.Random(seed).sample(codes, min(limit, len(codes))))
        records = [r for r in records if r.code in keep]
    # skin-tone variants share a base, so "waving hand" and "waving hand: dark skin tone" never
    # straddle the split; both styles of one code share it too
    val_bases = split_groups((r.base for r in records), val_fraction, seed)
    splits = {"train": [r for r in records if r.base not in val_bases],
              "val": [r for r in records if r.base in val_bases]}
    random.Random(seed).shuffle(splits["train"])  # mix styles and categories within each shard

    out = Path(out_dir)
    index: dict = {"splits": {}, "image_size": image_size, "samples_per_shard": samples_per_shard,
                   "source": {"name": "emoji", "styles": list(styles), "seed": seed,
                              "val_fraction": val_fraction, "limit": limit,
                              "packages": [f"emoji-datasource-{s}@{DATASOURCE_VERSION}" for s in styles]
                              + ["@".join(EMOJIBASE)],
                              "licenses": {s: LICENSES[s] for s in styles}}}
    with tqdm(total=len(records), desc="emoji shards", unit="img", disable=not progress) as bar:
        for split, recs in splits.items():
            names, counts = write_shards(_emoji_samples(recs, image_size, bar), out, split, samples_per_shard)
            index["splits"][split] = {"shards": names, "counts": counts, "total": sum(counts)}
    atomic_write_bytes(out / INDEX_NAME, json.dumps(index, indent=2).encode("utf-8"))
    remove_stale_shards(out, {n for s in index["splits"].values() for n in s["shards"]})
    return index
