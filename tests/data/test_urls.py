"""The same shards read from a local path, a `pipe:cat` command and http on loopback yield the same samples."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager

import torch

from ldm.data import make_loader, resolve_shards


@contextmanager
def serve_directory(folder, probe: str):
    """`python -m http.server` on a free loopback port serving folder; yields its base URL once `probe` answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(folder)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/{probe}", timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline, "http.server did not start"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def _read(urls):
    batches = list(make_loader(urls, batch_size=4, image_size=16, shuffle_buffer=0, seed=0))
    return [k for b in batches for k in b["key"]], torch.cat([b["image"] for b in batches]), [
        c for b in batches for c in b["caption"]]


def test_local_pipe_and_http_agree(tiny_shards):
    local = resolve_shards(str(tiny_shards), "train")
    names = [os.path.basename(u) for u in local]
    with serve_directory(tiny_shards, "index.json") as base:
        keys, images, captions = _read(local)
        assert len(keys) == sum(1 for _ in keys) > 0 and len(set(keys)) == len(keys)
        for urls in ([f"pipe:cat {u}" for u in local], [f"{base}/{n}" for n in names]):
            other_keys, other_images, other_captions = _read(urls)
            assert other_keys == keys and other_captions == captions
            assert torch.equal(other_images, images)
        # a brace pattern over http expands to the same shard list
        pattern = f"{base}/train-{{000000..{len(names) - 1:06d}}}.tar"
        assert resolve_shards(pattern) == [f"{base}/{n}" for n in sorted(names)]


def test_unreadable_urls_are_skipped_and_counted(tiny_shards, tmp_path, caplog):
    """An http 404, a refused connection and failing `pipe:` commands are each skipped with a warning and
    counted once; the readable shards among them are read in full."""
    local = resolve_shards(str(tiny_shards), "train")[0]
    name = os.path.basename(local)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # nothing listens here once the socket is closed
    with serve_directory(tiny_shards, "index.json") as base:
        urls = [f"{base}/missing-000000.tar", f"{base}/{name}", "pipe:exit 3", f"pipe:cat {tmp_path}/nothing.tar",
                f"pipe:cat {local}", f"http://127.0.0.1:{closed_port}/{name}"]
        with caplog.at_level(logging.WARNING, logger="ldm.data.stream"):
            batches = list(make_loader(urls, batch_size=5, image_size=16, shuffle_buffer=0))  # last batch partial
    keys = [k for b in batches for k in b["key"]]
    good, _, _ = _read([local])
    assert keys == good + good and len(good) > 0
    assert batches[-1]["skipped"] == 4
    warned = " ".join(r.getMessage() for r in caplog.records)
    for url in (urls[0], urls[2], urls[3], urls[5]):
        assert url in warned


def _keys(data, position, n: int) -> list[str]:
    """The sample keys of the next ``n`` micro-batches of the trainer's stream (seed 3, one rank) from ``position``."""
    from ldm.data.run_stream import batch_stream

    stream = batch_stream(data, 3, 0, 1, position)
    try:
        return [k for _, batch in zip(range(n), stream) for k in batch["key"]]
    finally:
        stream.close()  # stops the loader (and its workers)


def test_stop_and_resume_continues_with_the_unseen_samples(tiny_shards):
    """The trainer's data position over http shards: a stream stopped after k micro-batches (mid-epoch, at the epoch's
    end) and re-opened from the position it saved, as a resumed run does, yields what the uninterrupted stream yields
    next, across the epoch boundary, with 0 or 2 loader workers."""
    from ldm.config import LDMConfig, load_config
    from ldm.data.run_stream import DataPosition
    from tests.conftest import ROOT

    names = sorted(os.path.basename(u) for u in resolve_shards(str(tiny_shards), "train"))
    with serve_directory(tiny_shards, names[0]) as base:
        pattern = f"{base}/train-{{000000..{len(names) - 1:06d}}}.tar"
        for workers in (0, 2):
            data = load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml", [
                f"data.train={pattern}", "data.val=null", "data.image_size=16", "data.batch_size=2",
                "data.shuffle_buffer=8", f"data.num_workers={workers}", "data.batches_per_epoch=6"]).data
            full = _keys(data, DataPosition.of(data, 1, 1), 10)  # epoch 0 (6 micro-batches) and 4 of epoch 1
            assert len(full) == 20 and full[12:] != full[:8]  # epoch 1 is another order than epoch 0
            for stop in (4, 6):
                position = DataPosition.of(data, 1, 1)
                before = _keys(data, position, stop)
                saved = {**position.state(), "world_size": 1, "micro_batch": 2}  # what a checkpoint stores
                resumed = DataPosition.of(data, 1, 1)
                assert resumed.restore(saved, 1, 2) is None  # same layout: no warning
                assert before + _keys(data, resumed, 10 - stop) == full, (workers, stop)
