"""Shard writing (emoji build, index, atomic names) and the training stream (shapes, ranks, bad samples)."""

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli.shards import main as shards_main
from ldm.data.shards import build_emoji_shards, encode_png, write_shards
from ldm.data.stream import make_loader, resolve_shards


def tar_samples(path):
    """{key: {ext: bytes}} of one tar shard."""
    out = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def emoji_dir(tmp_path_factory, npm_cache):
    out = tmp_path_factory.mktemp("emoji")
    build_emoji_shards(out, image_size=16, samples_per_shard=16, limit=40, cache_dir=npm_cache)
    return out


def test_emoji_index_matches_shards(emoji_dir):
    index = json.loads((emoji_dir / "index.json").read_text())
    assert index["image_size"] == 16
    codes = {}
    for split, info in index["splits"].items():
        assert len(info["shards"]) == len(info["counts"]) and sum(info["counts"]) == info["total"] > 0
        codes[split] = set()
        for name, count in zip(info["shards"], info["counts"]):
            assert name.startswith(f"{split}-") and name.endswith(".tar")
            samples = tar_samples(emoji_dir / name)
            assert len(samples) == count <= 16
            for key, sample in samples.items():
                assert set(sample) == {"png", "txt", "json"}
                assert sample["txt"].decode().strip()
                meta = json.loads(sample["json"])
                assert meta["key"] == key and meta["label"] == sample["txt"].decode()
                image = Image.open(io.BytesIO(sample["png"]))
                assert image.mode == "RGB" and image.size == (16, 16)
                codes[split].add(meta["code"])
    assert index["splits"]["train"]["total"] + index["splits"]["val"]["total"] == 80  # 40 emoji x 2 styles
    assert not codes["train"] & codes["val"]
    assert not list(emoji_dir.glob("*.tmp"))


def test_cli_builds_and_rejects_bad_usage(tmp_path, npm_cache, capsys):
    cache = npm_cache
    assert shards_main(["emoji", "--out", str(tmp_path / "o"), "--limit", "3", "--cache", str(cache),
                        "--samples-per-shard", "2", "--styles", "twitter"]) == 0
    assert "train" in capsys.readouterr().out
    for argv in (["emoji"], ["emoji", "--out", "x", "--val-fraction", "1.5"], ["nope"]):
        with pytest.raises(SystemExit) as exc:
            shards_main(argv)
        assert exc.value.code == 2


def test_crash_leaves_no_partial_shard(tmp_path):
    def samples():
        for i in range(15):
            yield {"__key__": f"k{i}", "txt": "x"}
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        write_shards(samples(), tmp_path, "train", samples_per_shard=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]  # the half shard is gone
    assert len(tar_samples(tmp_path / "train-000000.tar")) == 10


def synthetic_sample(i: int) -> dict:
    """A varied sample: RGBA or RGB, non-square, caption and tags."""
    rng = np.random.default_rng(i)
    size = (24, 20) if i % 2 else (12, 12)
    mode = "RGBA" if i % 3 else "RGB"
    pixels = rng.integers(0, 256, size=(size[1], size[0], len(mode)), dtype=np.uint8)
    meta = {"tags": ["alpha", f"tag{i}", "label", "beta", "gamma"]}
    return {"__key__": f"s{i:03d}", "png": encode_png(Image.fromarray(pixels, mode)),
            "txt": f"label {i}", "json": json.dumps(meta).encode()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    names, counts = write_shards((synthetic_sample(i) for i in range(40)), out, "train", samples_per_shard=10)
    assert counts == [10, 10, 10, 10]
    return [str(out / n) for n in names]


def all_keys(loader):
    return [k for batch in loader for k in batch["key"]]


def test_batches_shapes_and_range(synth):
    batch = next(iter(make_loader(synth, batch_size=6, image_size=8, flip=True, caption="label_tags")))
    assert batch["image"].shape == (6, 3, 8, 8) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert len(batch["caption"]) == len(batch["key"]) == 6 and batch["skipped"] == 0
    i = int(batch["key"][0][1:])
    assert batch["caption"][0] == f"label {i}, alpha, tag{i}, beta"  # up to 3 tags, not repeating the label


def test_one_pass_covers_every_key_once(synth):
    keys = all_keys(make_loader(synth, batch_size=7, image_size=8))
    assert sorted(keys) == [f"s{i:03d}" for i in range(40)]
    by_rank = [all_keys(make_loader(synth, batch_size=7, image_size=8, rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(by_rank[0] + by_rank[1]) == sorted(keys)


def test_ranks_yield_same_number_of_batches(synth):
    for rank in (0, 1):
        batches = list(make_loader(synth[:3], batch_size=4, image_size=8, rank=rank, world_size=2,
                                   batches_per_epoch=5))
        assert len(batches) == 5 and all(len(b["key"]) == 4 for b in batches)
    workers = list(make_loader(synth, batch_size=4, image_size=8, rank=1, world_size=2, num_workers=2,
                               batches_per_epoch=3, shuffle_buffer=8))
    assert len(workers) == 3


def test_deterministic_given_seed_rank_epoch(synth):
    run = lambda **kw: all_keys(make_loader(synth, batch_size=8, image_size=8, shuffle_buffer=16, **kw))
    assert run(seed=1) == run(seed=1)
    assert run(seed=1) != run(seed=1, epoch=1)
    loader = make_loader(synth, batch_size=8, image_size=8, shuffle_buffer=16, seed=1)
    assert all_keys(loader) != all_keys(loader)  # each pass advances the epoch


def test_bad_samples_are_skipped_and_counted(tmp_path, caplog):
    samples = [synthetic_sample(i) for i in range(6)]
    samples[1]["png"] = b"\x89PNG\r\n\x1a\n this is not an image"
    samples[3]["txt"] = "  "
    del samples[4]["txt"]
    names, _ = write_shards(samples, tmp_path, "train")
    with caplog.at_level(logging.WARNING, logger="ldm.data.stream"):
        batches = list(make_loader([str(tmp_path / names[0])], batch_size=2, image_size=8, shuffle_buffer=0))
    assert [k for b in batches for k in b["key"]] == ["s000", "s002", "s005"]
    assert batches[-1]["skipped"] == 3
    assert sum("skipping bad sample" in r.message for r in caplog.records) == 3


def test_pipe_urls_match_plain_paths(synth):
    plain = all_keys(make_loader(synth, batch_size=5, image_size=8, seed=3))
    piped = all_keys(make_loader([f"pipe:cat {p}" for p in synth], batch_size=5, image_size=8, seed=3))
    assert piped == plain and len(plain) == 40


def test_resolve_shards(emoji_dir, synth):
    index = json.loads((emoji_dir / "index.json").read_text())
    expected = [str(emoji_dir / n) for n in index["splits"]["val"]["shards"]]
    assert resolve_shards(str(emoji_dir), "val") == expected
    assert resolve_shards(str(emoji_dir / "index.json"), "val") == expected
    folder = synth[0].rsplit("/", 1)[0]
    assert resolve_shards(folder + "/train-{000000..000003}.tar") == synth
    assert resolve_shards("pipe:cat x-{0..1}.tar") == ["pipe:cat x-0.tar", "pipe:cat x-1.tar"]
    assert resolve_shards(folder + "/train-*.tar") == synth
    with pytest.raises(ValueError, match="missing"):
        resolve_shards(folder + "/train-{000000..000004}.tar")
    with pytest.raises(ValueError, match="nothing-here"):
        resolve_shards(folder + "/nothing-here-{0..3}.tar")
    with pytest.raises(ValueError, match="test"):
        resolve_shards(str(emoji_dir), "test")


def test_truncated_shard_does_not_stop_the_stream(synth, tmp_path):
    broken = tmp_path / "broken.tar"
    data = Path(synth[0]).read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    keys = all_keys(make_loader([str(broken), synth[1]], batch_size=4, image_size=8, shuffle_buffer=0))
    assert set(keys) >= {f"s{i:03d}" for i in range(10, 20)}  # every sample of the intact shard


def test_unreadable_resampled_shards_raise_instead_of_spinning(tmp_path):
    loader = make_loader([str(tmp_path / "missing.tar")], batch_size=2, image_size=8, batches_per_epoch=2)
    with pytest.raises(RuntimeError, match="no sample"):
        list(loader)
