"""One unreadable shard among many does not stop the evaluation: its real-image reader skips and counts it, as the
training stream does, and draws the same sets from the readable shards."""

from __future__ import annotations

import json
import logging
import shutil

from ldm.eval import prepare_evaluator
from ldm.eval.realset import read_split


def test_an_empty_and_a_corrupt_shard_are_skipped_and_reported(eval_shards, tiny_inception, tmp_path, caplog):
    data = tmp_path / "shards"
    shutil.copytree(eval_shards, data)
    index = json.loads((data / "index.json").read_text())
    (data / "train-empty.tar").write_bytes(b"")  # a zero-byte shard, as a failed upload leaves
    (data / "train-corrupt.tar").write_bytes(b"not a tar archive" * 64)
    train = index["splits"]["train"]
    train["shards"] = ["train-empty.tar", *train["shards"], "train-corrupt.tar"]
    train["counts"] = [0, *train["counts"], 0]
    (data / "index.json").write_text(json.dumps(index))

    clean = read_split(str(eval_shards), "train", 32, progress=False)
    with caplog.at_level(logging.WARNING):
        damaged = read_split(str(data), "train", 32, progress=False)
    assert damaged.keys == clean.keys and damaged.captions == clean.captions
    assert (damaged.images == clean.images).all()
    report = [r.getMessage() for r in caplog.records if "unreadable and were skipped" in r.getMessage()]
    assert len(report) == 1 and "2 of" in report[0]

    n = len(clean) // 3
    settings = dict(image_size=32, num_images=n, reference_images=n, inception=tiny_inception, bootstrap=5,
                    batch_size=8, progress=False)
    evaluator = prepare_evaluator(str(data), cache_dir=tmp_path / "cache", **settings)  # raised tarfile.ReadError before
    reference = prepare_evaluator(str(eval_shards), cache_dir=tmp_path / "cache-clean", **settings)
    assert evaluator.prompts == reference.prompts and evaluator.reference.keys == reference.reference.keys
