"""Aspect-ratio buckets: sizes of about equal pixel count (SDXL's among them), the nearest bucket crops least, the
manifest from tar and image headers (cached, bad images counted), the epoch plan (one bucket per global batch, every
sample once but the N mod G that wait, reported), and the stream of 2 ranks x 2 workers resuming mid-epoch."""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ldm.config import BucketConfig, DataConfig
from ldm.data import held_out
from ldm.data.buckets import (
    bucket_sizes, build_manifest, epoch_plan, nearest_bucket, plan_report, rank_rows,
)
from ldm.data.decode import resize_crop

# (width, height) of the test images: wide, square, tall, and an extreme one that is nearest to the wide bucket
SHAPES = [(30, 18), (20, 20), (18, 30), (40, 12), (26, 21)]
BASE, MULTIPLE = 16, 4  # buckets (12, 20), (16, 16), (20, 12)


def _jpeg(i: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_mixed_folder(folder: Path, train: int, per_shard: int = 7, val_fraction: float = 0.0,
                       bad: int = 0) -> tuple[set[str], set[str]]:
    """img2dataset-style numbered tars of images of the SHAPES (cycled), until ``train`` keys are not held out by
    val_fraction; ``bad`` more samples whose image bytes are not an image. Returns (train keys, held-out keys)."""
    folder.mkdir(parents=True, exist_ok=True)
    train_keys, val_keys, samples, i = set(), set(), [], 0
    while len(train_keys) < train:
        key = f"{i:09d}"
        (val_keys if val_fraction and held_out(key, val_fraction, 0) else train_keys).add(key)
        samples.append({"__key__": key, "jpg": _jpeg(i, SHAPES[i % len(SHAPES)]), "txt": f"photo {i % 5}",
                        "json": json.dumps({"key": key}).encode()})
        i += 1
    for j in range(bad):
        samples.insert(3 + j, {"__key__": f"bad{j:06d}", "jpg": b"not an image", "txt": "broken"})
    for s in range(0, len(samples), per_shard):
        with wds.TarWriter(str(folder / f"{s // per_shard:05d}.tar")) as tar:
            for sample in samples[s:s + per_shard]:
                tar.write(sample)
    return train_keys, val_keys


def test_derived_sizes_have_about_equal_pixels():
    sizes = bucket_sizes(None, 1024, 64, 2.5)
    sdxl = {(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
            (1536, 640), (640, 1536)}  # SDXL's multi-aspect training sizes (Podell et al. 2023, App. I)
    assert sdxl <= set(sizes)
    assert all(w % 64 == 0 and h % 64 == 0 and 0.9 * 1024**2 <= w * h <= 1024**2 for w, h in sizes)
    assert all(max(w / h, h / w) <= 2.5 for w, h in sizes)
    ratios = [w / h for w, h in sizes]
    assert ratios == sorted(ratios) and len(set(sizes)) == len(sizes)
    assert bucket_sizes(None, BASE, MULTIPLE, 2.0) == [(12, 20), (16, 16), (20, 12)]
    assert bucket_sizes([[20, 12], [16, 16], [20, 12]], 99) == [(16, 16), (20, 12)]  # given sizes, deduplicated
    with pytest.raises(ValueError, match="larger than the base size"):
        bucket_sizes(None, 16, 32)


def test_nearest_bucket_crops_least():
    sizes = bucket_sizes(None, 64, 8, 3.0)
    rng = random.Random(0)
    for _ in range(40):
        w, h = rng.randint(10, 300), rng.randint(10, 300)
        image = Image.new("RGB", (w, h))
        kept = []  # the fraction of the resized image a bucket keeps
        for bw, bh in sizes:
            out, (top, left) = resize_crop(image, bw, bh)
            assert out.size == (bw, bh)
            scaled = (bw + 2 * left, bh + 2 * top)  # the resized image before the (centred) crop, +-1 px
            kept.append(bw * bh / (scaled[0] * scaled[1]))
        chosen = nearest_bucket(sizes, math.log(w / h))
        assert kept[chosen] >= max(kept) - 0.06, (w, h, sizes[chosen])  # rounding of 1 px at these sizes


def test_manifest_reads_headers_counts_bad_images_and_is_cached(tmp_path, monkeypatch):
    import ldm.data.buckets as buckets

    monkeypatch.setenv("LDM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(buckets, "_scans", {})
    keys, _ = write_mixed_folder(tmp_path / "data", train=12, bad=2)
    urls = sorted(str(p) for p in (tmp_path / "data").glob("*.tar"))
    manifest = build_manifest(urls)
    assert set(manifest.keys) == keys and manifest.skipped == 2
    for i, key in enumerate(manifest.keys):
        assert manifest.sizes[i] == SHAPES[int(key) % len(SHAPES)]
        sample = manifest.read(i, {})
        with Image.open(io.BytesIO(sample["jpg"])) as image:
            assert image.size == manifest.sizes[i] and sample["txt"] == f"photo {int(key) % 5}".encode()
    assert len(list((tmp_path / "cache" / "buckets").glob("*.json"))) == len(urls)
    monkeypatch.setattr(buckets, "_scans", {})  # a new process: the scans come from the cache files
    monkeypatch.setattr(buckets, "scan_shard", lambda path: pytest.fail(f"{path} scanned again"))
    again = build_manifest(urls)
    assert again.keys == manifest.keys and again.sizes == manifest.sizes and again.skipped == 2


@pytest.mark.parametrize("n", [48, 53])
def test_epoch_plan_one_bucket_per_global_batch_every_sample_once(n):
    sizes = bucket_sizes(None, BASE, MULTIPLE, 2.0)
    rng = random.Random(n)
    ratios = [math.log(rng.choice(SHAPES)[0] / rng.choice(SHAPES)[1]) for _ in range(n)]
    bucket_of = [nearest_bucket(sizes, r) for r in ratios]
    G = 8
    plans = [epoch_plan(bucket_of, ratios, sizes, G, seed=3, epoch=e) for e in range(3)]
    assert epoch_plan(bucket_of, ratios, sizes, G, seed=3, epoch=1) == plans[1]  # a pure function
    waiting = []
    for plan in plans:
        assert len(plan) == n // G and all(len(idx) == G for _, idx in plan)
        seen = [i for _, idx in plan for i in idx]
        assert len(seen) == len(set(seen))  # none doubled
        waiting.append(set(range(n)) - set(seen))
        assert len(waiting[-1]) == n % G  # none lost: only the N mod G wait (and are reported)
        for bucket, idx in plan:  # a batch of its own bucket's images, or of remainders trained at their nearest
            own = [i for i in idx if bucket_of[i] == bucket]
            assert len(own) == G or bucket == nearest_bucket(sizes, sum(ratios[i] for i in idx) / G)
    if n % G:
        assert waiting[0] != waiting[1] or waiting[1] != waiting[2]  # another draw each epoch
    rows = [rank_rows(plans[0], r, 2, 2, 2) for r in (0, 1)]  # 2 ranks x 2 accumulation x micro-batch 2
    for g, (bucket, idx) in enumerate(plans[0]):
        parts = [rows[r][2 * g + a] for a in (0, 1) for r in (0, 1)]
        assert {b for b, _ in parts} == {bucket} and sorted(i for _, p in parts for i in p) == sorted(idx)
    report = "\n".join(plan_report(bucket_of, sizes, G, skipped=1))
    assert f"{n} images" in report and f"{n % G} images (another draw each epoch) wait" in report
    assert "1 samples without a readable image skipped" in report


def test_two_ranks_two_workers_one_shape_per_step_and_exact_resume(tmp_path, monkeypatch):
    from ldm.data.run_stream import DataPosition, batch_stream

    monkeypatch.setenv("LDM_CACHE", str(tmp_path / "cache"))
    keys, held = write_mixed_folder(tmp_path / "data", train=24, val_fraction=0.25)
    data = DataConfig(train=str(tmp_path / "data"), val=None, val_fraction=0.25, image_size=BASE, batch_size=2,
                      num_workers=2, buckets=BucketConfig(multiple=MULTIPLE))
    world, accum = 2, 2  # global batch 8: 3 steps per epoch over the 24 training keys

    def take(rank: int, position: DataPosition, n: int) -> list[dict]:
        stream = batch_stream(data, 5, rank, world, position)
        return [next(stream) for _ in range(n)]

    positions = [DataPosition.of(data, world, accum) for _ in range(world)]
    assert positions[0].per_epoch == 3 * accum
    runs = [take(r, positions[r], 4 * accum) for r in range(world)]  # 4 steps: epoch 0 and one step of epoch 1
    for step in range(4):
        shapes = {tuple(runs[r][step * accum + a]["image"].shape) for r in range(world) for a in range(accum)}
        assert len(shapes) == 1, (step, shapes)  # every rank and micro-step of a step: one bucket
    epoch0 = [k for r in range(world) for b in runs[r][:3 * accum] for k in b["key"]]
    assert sorted(epoch0) == sorted(keys) and not set(epoch0) & held  # all 24 once; none of the held-out
    shapes = {tuple(b["image"].shape[-2:]) for run in runs for b in run}  # (H, W)
    assert len(shapes) >= 2 and shapes <= {(20, 12), (16, 16), (12, 20)}  # several buckets, each one of the sizes
    assert all(b["original_size"].shape == (2, 2) and b["crop_top_left"].shape == (2, 2) for b in runs[0])
    # resume each rank at its checkpointed position (after step 2) in a fresh stream: the same continuation
    for r in range(world):
        saved = DataPosition.of(data, world, accum)
        take(r, saved, 2 * accum)
        resumed = DataPosition.of(data, world, accum)
        assert resumed.restore(saved.state(), world, data.batch_size) is None
        rest = take(r, resumed, 2 * accum)
        assert [b["key"] for b in rest] == [b["key"] for b in runs[r][2 * accum:]]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(rest, runs[r][2 * accum:]))
    assert [b["key"] for b in take(0, DataPosition.of(data, world, accum), 1)] == [runs[0][0]["key"]]


def test_bucket_config_is_checked():
    from ldm.config import ConfigError, LDMConfig, load_config
    from tests.conftest import ROOT

    def load(*overrides):
        return load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml", list(overrides))

    assert load("data.buckets.multiple=8").data.buckets == BucketConfig(multiple=8)
    for overrides, key in ((["data.buckets.sizes=[[16]]"], r"data.buckets.sizes\[0\]"),
                           (["data.buckets.max_ratio=0.5"], "data.buckets"),
                           (["data.buckets.multiple=8", "data.latents=x"], "data.buckets"),
                           (["data.buckets.multiple=8", "data.batches_per_epoch=3"], "data.batches_per_epoch")):
        with pytest.raises(ConfigError, match=key):
            load(*overrides)


def test_fewer_images_than_a_global_batch_is_refused(tmp_path, monkeypatch):
    from ldm.data.skips import NoUsableData
    from ldm.data.run_stream import DataPosition

    monkeypatch.setenv("LDM_CACHE", str(tmp_path / "cache"))
    write_mixed_folder(tmp_path / "data", train=5, bad=3)
    data = DataConfig(train=str(tmp_path / "data"), val=None, image_size=BASE, batch_size=2,
                      buckets=BucketConfig(multiple=MULTIPLE))
    with pytest.raises(NoUsableData, match="data.buckets: 5 training images .* fewer than one global batch of 8"):
        DataPosition.of(data, 2, 2)
