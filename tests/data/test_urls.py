"""The same shards read from a local path, a `pipe:cat` command and http on loopback yield the same samples."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import torch

from ldm.data import make_loader, resolve_shards


def _read(urls):
    batches = list(make_loader(urls, batch_size=4, image_size=16, shuffle_buffer=0, seed=0))
    return [k for b in batches for k in b["key"]], torch.cat([b["image"] for b in batches]), [
        c for b in batches for c in b["caption"]]


def test_local_pipe_and_http_agree(tiny_shards):
    local = resolve_shards(str(tiny_shards), "train")
    names = [os.path.basename(u) for u in local]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(tiny_shards)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/index.json", timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline, "http.server did not start"
                time.sleep(0.2)
        keys, images, captions = _read(local)
        assert len(keys) == sum(1 for _ in keys) > 0 and len(set(keys)) == len(keys)
        for urls in ([f"pipe:cat {u}" for u in local], [f"http://127.0.0.1:{port}/{n}" for n in names]):
            other_keys, other_images, other_captions = _read(urls)
            assert other_keys == keys and other_captions == captions
            assert torch.equal(other_images, images)
        # a brace pattern over http expands to the same shard list
        pattern = f"http://127.0.0.1:{port}/train-{{000000..{len(names) - 1:06d}}}.tar"
        assert resolve_shards(pattern) == [f"http://127.0.0.1:{port}/{n}" for n in sorted(names)]
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def test_stop_and_resume_continues_with_the_unseen_samples(tiny_shards):
    """The stream is a pure function of (seed, epoch, rank, worker): re-opening it at a saved position
    (epoch, batches consumed) and skipping what was consumed continues exactly, with 0 or 2 workers."""
    urls = resolve_shards(str(tiny_shards), "train")
    for workers in (0, 2):
        args = dict(batch_size=2, image_size=16, seed=3, shuffle_buffer=8, num_workers=workers,
                    batches_per_epoch=6, epoch=1)
        full = [b["key"] for b in make_loader(urls, **args)]
        before = [b["key"] for _, b in zip(range(4), make_loader(urls, **args))]  # stopped after 4 batches
        after = [b["key"] for i, b in enumerate(make_loader(urls, **args)) if i >= 4]  # resumed at position 4
        assert before + after == full and len(full) == 6
