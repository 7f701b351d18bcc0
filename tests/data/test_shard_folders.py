"""Any shard folder: an img2dataset output (numbered tars, no index.json) as a data spec, a validation part held out
by a stable hash of the key (the same keys `reshard --val-fraction` holds out), a separate validation folder,
an empty folder refused by name."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from ldm.data import KeyHoldout, dataset_size, held_out, make_loader, reshard, resolve_shards, resolve_split
from ldm.data.stream import has_splits, iter_keys

SHARDS, PER_SHARD = 3, 12


def _jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)
    size = (20 + i % 7, 14 + i % 5)  # mixed sizes and aspect ratios, as downloaded images are
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_img2dataset_folder(folder: Path, shards: int = SHARDS, per_shard: int = PER_SHARD, start: int = 0) -> set[str]:
    """Shards laid out as img2dataset writes them: NNNNN.tar with key.jpg/.txt/.json, plus parquet/stats files."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = set()
    for s in range(start, start + shards):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as tar:
            for j in range(per_shard):
                key = f"{s:05d}{j:04d}"  # img2dataset keys: shard number then index within it
                meta = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success"}
                tar.write({"__key__": key, "jpg": _jpeg(s * per_shard + j), "txt": f"photo {key}",
                           "json": json.dumps(meta).encode()})
                keys.add(key)
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
        (folder / f"{s:05d}.parquet").write_bytes(b"PAR1 not read")
    return keys


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> tuple[Path, set[str]]:
    folder = tmp_path_factory.mktemp("img2dataset")
    return folder, write_img2dataset_folder(folder)


def _keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def test_img2dataset_folder_is_a_data_spec(downloads):
    folder, keys = downloads
    assert not has_splits(str(folder))
    shards = resolve_shards(str(folder))
    assert shards == [str(folder / f"{s:05d}.tar") for s in range(SHARDS)]  # the tars only, in order
    assert resolve_shards(str(folder), "val") == shards  # one split, like a pattern: a separate val folder works
    assert dataset_size(str(folder)) == len(keys) == 36
    assert list(iter_keys(shards[:1])) == [f"00000{j:04d}" for j in range(PER_SHARD)]
    batches = list(make_loader(str(folder), batch_size=5, image_size=8, shuffle_buffer=0))
    assert sorted(_keys(batches)) == sorted(keys)
    assert batches[0]["image"].shape == (5, 3, 8, 8) and batches[0]["caption"][0] == "photo 000000000"
    assert batches[-1]["skipped"] == 0


def test_validation_held_out_by_key_hash(downloads, tmp_path):
    folder, keys = downloads
    fraction = 0.3
    train_urls, train_part = resolve_split(str(folder), "train", fraction)
    val_urls, val_part = resolve_split(str(folder), "val", fraction)
    assert train_urls == val_urls == resolve_shards(str(folder))
    assert train_part == KeyHoldout(fraction, "train") and val_part == KeyHoldout(fraction, "val")
    expected_val = {k for k in keys if held_out(k, fraction, 0)}
    assert 4 <= len(expected_val) <= 18  # about 30% of 36

    val = _keys(make_loader(val_urls, batch_size=4, image_size=8, holdout=val_part))
    train = _keys(make_loader(train_urls, batch_size=4, image_size=8, holdout=train_part, seed=5))
    assert sorted(val) == sorted(expected_val) and set(train) == keys - expected_val and len(train) == len(set(train))
    assert dataset_size(str(folder), "val", val_part) == len(val) and dataset_size(str(folder), "train", train_part) \
        == len(train)
    # the split does not depend on ranks, workers, shuffling or the epoch
    parts = [_keys(make_loader(val_urls, batch_size=3, image_size=8, rank=r, world_size=2, num_workers=2,
                               shuffle_buffer=8, epoch=3, holdout=val_part)) for r in (0, 1)]
    assert sorted(parts[0] + parts[1]) == sorted(expected_val)
    # and it is the split `ldm-shards reshard --val-fraction 0.3 --seed 0` writes for the same input
    index = reshard([str(folder)], tmp_path / "resharded", image_size=8, val_fraction=fraction, seed=0)
    resharded_val = _keys(make_loader(resolve_shards(str(tmp_path / "resharded"), "val"), batch_size=4, image_size=8))
    assert sorted(resharded_val) == sorted(expected_val) and index["splits"]["val"]["total"] == len(expected_val)
    # another seed holds out other keys; a spec with its own splits keeps them (no holdout)
    assert {k for k in keys if held_out(k, fraction, 1)} != expected_val
    resharded = resolve_shards(str(tmp_path / "resharded"), "val")
    assert resolve_split(str(tmp_path / "resharded"), "val", fraction) == (resharded, None)
    with pytest.raises(ValueError, match="fraction"):
        resolve_split(str(folder), "val", 1.0)


def test_separate_validation_folder(downloads, tmp_path):
    folder, keys = downloads
    val_keys = write_img2dataset_folder(tmp_path / "val", shards=1, per_shard=5, start=7)
    urls, holdout = resolve_split(str(tmp_path / "val"), "val")  # no fraction: all of the val folder
    assert holdout is None and urls == [str(tmp_path / "val" / "00007.tar")]
    assert sorted(_keys(make_loader(urls, batch_size=2, image_size=8))) == sorted(val_keys)
    assert not val_keys & keys


def test_folder_without_shards_is_refused_by_name(tmp_path):
    empty = tmp_path / "my-downloads"
    empty.mkdir()
    (empty / "00000_stats.json").write_text("{}")
    (empty / "00000.parquet").write_bytes(b"")
    for call in (lambda: resolve_shards(str(empty)), lambda: resolve_split(str(empty), "val", 0.1),
                 lambda: make_loader(str(empty), batch_size=2, image_size=8), lambda: dataset_size(str(empty))):
        with pytest.raises(ValueError, match=f"{empty}: no shards in this folder"):
            call()
