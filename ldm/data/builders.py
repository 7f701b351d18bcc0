"""Dataset builders: a captioned image folder (sidecar .txt, CSV or JSONL) and re-sharding img2dataset shards.

Both write what `ldm-shards emoji` writes: `train-NNNNNN.tar` / `val-NNNNNN.tar` (image, `txt`, `json` per
sample) and an index.json with shard names and counts, which the stream's resolve_shards / dataset_size read.

* Images are decoded with PIL and made RGB by the stream's own `to_rgb` (transparency composited on white;
  palette, grey, CMYK and 16-bit converted), then resized + centre-cropped to `image_size` (None keeps the size).
  An image that comes out unchanged (an RGB JPEG, PNG or WebP already at the output size) keeps its original
  bytes, so JPEG stays JPEG without a second lossy encode; every other image is re-encoded as lossless PNG.
* The held-out split is a stable hash of (seed, name) -- the listed path for folders, the key for shards -- so
  a sample's split does not depend on the order, on the other samples or on the machine.
* Folder samples are written in a seeded shuffled order; re-sharded samples keep the input order.
* Bad input (corrupt image, missing or empty caption, missing file, truncated or unreadable tar) is skipped
  with a warning and counted by reason; index.json stores the counts under "skipped".
* Same input and seed give byte-identical shards (fixed tar mtime, deterministic encoders).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm
from webdataset.tariterators import group_by_keys, tar_file_expander

from ldm.data.decode import IMAGE_EXTENSIONS, resize_center_crop, to_rgb
from ldm.data.shards import INDEX_NAME, encode_png, remove_stale_shards, write_shards
from ldm.data.skips import SkipCounter, open_shards
from ldm.data.split import held_out
from ldm.data.stream import resolve_shards
from ldm.io import atomic_write_bytes

log = logging.getLogger(__name__)

FOLDER_EXTENSIONS = (*IMAGE_EXTENSIONS, "bmp", "gif", "tif", "tiff")
PATH_COLUMNS = ("path", "file", "image")
CAPTION_COLUMNS = ("caption", "text")
KEEP_BYTES = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # formats whose RGB images are stored as they are


class BuildError(ValueError):
    """Input that cannot be built at all (missing folder, a caption file without its columns, no usable sample)."""


class Skips:
    """Skipped inputs counted by reason; each one is logged as a warning."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, reason: str, what: str, detail: object = "") -> None:
        self.counts[reason] += 1
        log.warning("skipping %s: %s%s", what, reason, f" ({detail})" if detail else "")

    def as_dict(self) -> dict[str, int]:
        return dict(sorted((k, v) for k, v in self.counts.items() if v))


def prepare_image(data: bytes, image_size: int | None) -> tuple[str, bytes]:
    """(extension, bytes) of an encoded image made RGB and resized; raises on bytes PIL cannot decode."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        rgb = to_rgb(image)
        out = rgb if image_size is None else resize_center_crop(rgb, image_size)
        if (image.format in KEEP_BYTES and image.mode == "RGB" and "transparency" not in image.info
                and out.size == image.size):
            return KEEP_BYTES[image.format], data
    return "png", encode_png(out)


def make_sample(key: str, what: str, image: bytes, caption: str | None, meta: dict, image_size: int | None,
                skips: Skips) -> dict | None:
    """A shard sample {__key__, png|jpg|webp, txt, json}, or None (counted in skips) when the input is bad."""
    if caption is None:
        skips.add("missing_caption", what)
        return None
    caption = caption.strip()
    if not caption:
        skips.add("empty_caption", what)
        return None
    try:
        ext, encoded = prepare_image(image, image_size)
    except Exception as exn:  # PIL raises many types for bad bytes; any of them means: not an image
        skips.add("corrupt_image", what, "unknown format" if isinstance(exn, UnidentifiedImageError) else exn)
        return None
    return {"__key__": key, ext: encoded, "txt": caption,
            "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")}


def _write_dataset(named: Iterable[tuple[str, dict]], out: Path, index: dict, *, val_fraction: float, seed: int,
                   samples_per_shard: int, skips: Skips) -> dict:
    """Write (name, sample) pairs as train/val shards in one pass over the input, then index.json."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out.mkdir(parents=True, exist_ok=True)
    spool_path = out / "val-spool.tar.tmp"  # held-out samples wait here while the train shards are written
    try:
        with open(spool_path, "wb") as file:
            spool = wds.TarWriter(file, mtime=0)

            def train() -> Iterator[dict]:
                for name, sample in named:
                    if held_out(name, val_fraction, seed):
                        spool.write(sample)
                    else:
                        yield sample

            written = {"train": write_shards(train(), out, "train", samples_per_shard)}
            spool.close()
        with open(spool_path, "rb") as file:
            spooled = group_by_keys(tar_file_expander([{"url": str(spool_path), "stream": file}]))
            val = ({k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")} for s in spooled)
            written["val"] = write_shards(val, out, "val", samples_per_shard)
    finally:
        spool_path.unlink(missing_ok=True)
    index["splits"] = {split: {"shards": names, "counts": counts, "total": sum(counts)}
                       for split, (names, counts) in written.items() if names}
    index["skipped"] = skips.as_dict()
    if not index["splits"]:
        raise BuildError(f"no usable sample in the input (skipped: {index['skipped'] or 'none'})")
    atomic_write_bytes(out / INDEX_NAME, json.dumps(index, indent=2).encode("utf-8"))
    remove_stale_shards(out, {n for s in index["splits"].values() for n in s["shards"]})
    return index


# --- image folders ---------------------------------------------------------------------------------------

@dataclass
class ImageRecord:
    """One listed image: the name it was listed under, its file, caption (None: none given) and extra metadata."""

    name: str
    path: Path
    caption: str | None
    meta: dict = field(default_factory=dict)


def _read_table(path: Path) -> tuple[list[dict], list[str]]:
    """Rows and column names of a CSV (with a header) or JSONL (one object per line) file."""
    if not path.is_file():
        raise BuildError(f"captions file {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = [{k: v for k, v in row.items() if k is not None} for row in reader]
            return rows, list(reader.fieldnames or [])
    if suffix in (".jsonl", ".ndjson"):
        rows, columns = [], {}
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exn:
                raise BuildError(f"{path}:{n}: not valid JSON ({exn})") from None
            if not isinstance(row, dict):
                raise BuildError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
            columns.update(dict.fromkeys(row))
        return rows, list(columns)
    raise BuildError(f"captions file {path}: expected a .csv or .jsonl file")


def _pick_column(columns: list[str], given: str | None, defaults: tuple[str, ...], what: str, source: Path) -> str:
    """The column holding `what`: the given name, else the first default present."""
    if given is not None:
        if given not in columns:
            raise BuildError(f"{source}: no {what} column {given!r} (columns: {', '.join(columns) or 'none'})")
        return given
    for name in defaults:
        if name in columns:
            return name
    raise BuildError(f"{source}: no {what} column (looked for {', '.join(defaults)}; "
                     f"columns: {', '.join(columns) or 'none'})")


def folder_records(images: str | Path, captions: str | Path | None = None, path_column: str | None = None,
                   caption_column: str | None = None) -> list[ImageRecord]:
    """Images of a folder with sidecar `<stem>.txt` captions, or the rows of a CSV / JSONL caption file.

    Paths in a caption file are relative to `images` (absolute paths are taken as they are); its other
    columns become metadata.
    """
    root = Path(images)
    if not root.is_dir():
        raise BuildError(f"image folder {images} not found")
    if captions is None:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower()[1:] in FOLDER_EXTENSIONS)
        if not files:
            raise BuildError(f"image folder {images} has no images ({', '.join(FOLDER_EXTENSIONS)})")
        records = []
        for path in files:
            sidecar = path.with_suffix(".txt")
            caption = sidecar.read_text(encoding="utf-8", errors="replace") if sidecar.is_file() else None
            records.append(ImageRecord(path.relative_to(root).as_posix(), path, caption))
        return records
    table = Path(captions)
    rows, columns = _read_table(table)
    path_col = _pick_column(columns, path_column, PATH_COLUMNS, "path", table)
    caption_col = _pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", table)
    records = []
    for row in rows:
        name, caption = row.get(path_col), row.get(caption_col)
        name = "" if name is None else str(name)
        meta = {k: v for k, v in row.items() if k not in (path_col, caption_col)}
        records.append(ImageRecord(name, root / name, None if caption is None else str(caption), meta))
    return records


def _key_of(name: str, used: set[str]) -> str:
    """A unique WebDataset key from a path: no dots or slashes (the key ends at the first dot)."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", str(Path(name).with_suffix(""))).strip("_") or "sample"
    key, n = base, 1
    while key in used:
        key, n = f"{base}_{n}", n + 1
    used.add(key)
    return key


def _folder_samples(records: list[ImageRecord], image_size: int | None, skips: Skips,
                    bar: tqdm) -> Iterator[tuple[str, dict]]:
    used: set[str] = set()
    for rec in records:
        bar.update(1)
        if not rec.name or not rec.path.is_file():
            skips.add("missing_file", repr(rec.name), rec.path)
            continue
        try:
            data = rec.path.read_bytes()
        except OSError as exn:
            skips.add("unreadable_file", repr(rec.name), exn)
            continue
        sample = make_sample(_key_of(rec.name, used), repr(rec.name), data, rec.caption,
                             {**rec.meta, "source": rec.name}, image_size, skips)
        if sample is not None:
            yield rec.name, sample


def build_folder_shards(images: str | Path, out_dir: str | Path, *, captions: str | Path | None = None,
                        path_column: str | None = None, caption_column: str | None = None,
                        image_size: int | None = None, samples_per_shard: int = 1000, val_fraction: float = 0.05,
                        seed: int = 0, progress: bool = False) -> dict:
    """Build train/val shards from an image folder (sidecar captions or a CSV / JSONL file); returns the index."""
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be >= 1 or None, got {image_size}")
    records = folder_records(images, captions, path_column, caption_column)
    random.Random(seed).shuffle(records)  # mix folders / classes within each shard
    skips = Skips()
    index = {"image_size": image_size, "samples_per_shard": samples_per_shard,
             "source": {"name": "folder", "images": str(images), "captions": captions and str(captions),
                        "seed": seed, "val_fraction": val_fraction}}
    with tqdm(total=len(records), desc="folder shards", unit="img", disable=not progress) as bar:
        return _write_dataset(_folder_samples(records, image_size, skips, bar), Path(out_dir), index,
                              val_fraction=val_fraction, seed=seed, samples_per_shard=samples_per_shard, skips=skips)


# --- re-sharding ---------------------------------------------------------------------------------------

def input_shards(specs: Iterable[str]) -> list[str]:
    """Tar URLs of the inputs: a folder (its *.tar files), or anything resolve_shards reads (pattern, URL, pipe:)."""
    urls: list[str] = []
    for spec in specs:
        path = Path(spec)
        if "://" not in spec and not spec.startswith("pipe:") and path.is_dir() and not (path / INDEX_NAME).is_file():
            found = sorted(str(p) for p in path.glob("*.tar"))
            if not found:
                raise BuildError(f"input folder {spec} has no .tar files")
            urls += found
            continue
        try:
            urls += resolve_shards(spec, "train")
        except ValueError as exn:
            raise BuildError(f"input {spec}: {exn}") from None
    return urls


def _reshard_samples(raw: Iterable[dict], image_size: int | None, skips: Skips,
                     bar: tqdm) -> Iterator[tuple[str, dict]]:
    for sample in raw:
        bar.update(1)
        key, url = sample["__key__"], sample.get("__url__")
        what = f"{key!r} in {url}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            skips.add("no_image", what)
            continue
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
        except ValueError as exn:
            skips.add("bad_json", what, exn)
            continue
        if not isinstance(meta, dict):
            skips.add("bad_json", what, "not a JSON object")
            continue
        caption = sample["txt"].decode("utf-8", errors="replace") if "txt" in sample else None
        meta["source"] = f"{url}#{key}.{ext}"
        out = make_sample(key, what, sample[ext], caption, meta, image_size, skips)
        if out is not None:
            yield key, out


def reshard(inputs: Iterable[str], out_dir: str | Path, *, image_size: int | None = None,
            samples_per_shard: int = 1000, val_fraction: float = 0.05, seed: int = 0, progress: bool = False) -> dict:
    """Re-shard img2dataset-style tars (`key.jpg|png|webp`, `key.txt`, `key.json`) into train/val shards."""
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be >= 1 or None, got {image_size}")
    specs = [str(s) for s in inputs]
    urls = input_shards(specs)
    skips = Skips()
    bad_shards = SkipCounter(max_empty_shards=len(urls))  # the stream's handling of bad tars (one count each)
    files = tar_file_expander(open_shards(({"url": u} for u in urls), bad_shards), handler=bad_shards.handler)
    index = {"image_size": image_size, "samples_per_shard": samples_per_shard,
             "source": {"name": "reshard", "inputs": specs, "shards": len(urls), "seed": seed,
                        "val_fraction": val_fraction}}
    with tqdm(desc="reshard", unit="img", disable=not progress) as bar:

        def samples() -> Iterator[tuple[str, dict]]:
            yield from _reshard_samples(group_by_keys(files, handler=bad_shards.handler), image_size, skips, bar)
            skips.counts["bad_shard"] += bad_shards.count  # known once every input has been read

        return _write_dataset(samples(), Path(out_dir), index, val_fraction=val_fraction, seed=seed,
                              samples_per_shard=samples_per_shard, skips=skips)
