"""Aspect-ratio buckets under DeepSpeed with 2 processes x 2 DataLoader workers (and 2 accumulation micro-steps) on
an img2dataset-style folder of mixed aspect ratios, 25% held out by key hash, an SDXL-layout UNet conditioned on two
encoders (features concatenated, pooled from the second) and the images' size/crop micro-conditions: every step's
micro-batches have one shape on both ranks; epoch 0 trains every training key once; kill -9 mid-epoch and the resumed
run continues the planned sequence exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, tiny_ldm_overrides
from tests.data.test_buckets import BASE, MULTIPLE, write_mixed_folder

ACCUM = 2


def _overrides(data, autoencoder, out, tiny_shards) -> list[str]:
    return [*tiny_ldm_overrides(tiny_shards, autoencoder, out, None), f"data.train={data}", "data.val=null",
            "data.val_fraction=0.25", f"data.image_size={BASE}", "data.batch_size=2", "data.num_workers=2",
            f"data.buckets.multiple={MULTIPLE}", f"train.grad_accum={ACCUM}", "train.max_steps=5",
            "train.ckpt_every=2", "model.preset=tiny-sdxl", "model.addition_time_embed_dim=8",
            "text_encoder.encoders=[{kind: hf}, {kind: hf, pooled: true}]", "sampling.steps=2"]


def _launch(logs, overrides) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           "-m", "tests.train.bucket_worker", str(logs), *overrides]
    return subprocess.Popen(cmd, stdout=open(logs / "output.txt", "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            start_new_session=True)


def _kill9_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (torchrun starts each worker in a session of its own)."""
    children: dict[int, list[int]] = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _logged(logs) -> list[list[dict]]:
    return [[json.loads(line) for line in (logs / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]


@pytest.mark.distributed
def test_buckets_two_processes_kill_and_resume(tmp_path, tiny_shards, tiny_autoencoder, monkeypatch):
    from ldm.config import LDMConfig, load_config
    from ldm.data.run_stream import DataPosition, batch_stream

    monkeypatch.setenv("LDM_CACHE", str(tmp_path / "cache"))  # the workers inherit it: one bucket-scan cache
    keys, held = write_mixed_folder(tmp_path / "data", train=24, val_fraction=0.25)
    run = tmp_path / "run"
    overrides = _overrides(tmp_path / "data", tiny_autoencoder, run, tiny_shards)
    cfg = load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml", overrides)
    # the planned sequence: 24 keys, global batches of 2 ranks x 2 micro-steps x 2 = 8, 3 steps per epoch
    planned = []
    for r in (0, 1):
        stream = batch_stream(cfg.data, cfg.run.seed, r, 2, DataPosition.of(cfg.data, 2, ACCUM))
        planned.append([next(stream)["key"] for _ in range(5 * ACCUM)])

    proc = _launch(tmp_path / "killed", overrides)
    deadline = time.time() + 600
    while not (run / "checkpoints" / "latest").exists():
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "killed" / "output.txt").read_text()[-3000:]
        time.sleep(0.1)
    _kill9_tree(proc.pid)  # kill -9 torchrun and both ranks
    proc.wait()
    out = (tmp_path / "killed" / "output.txt").read_text()
    assert "buckets: 24 images in" in out and "under-filled" in out, out[-3000:]  # the plan is reported
    assert not (run / "export").exists(), (sorted(p.name for p in run.iterdir()), out[-4000:])
    resumed_at = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step"))
    assert resumed_at in (2, 4)  # mid-epoch: an epoch is 3 steps

    proc = _launch(tmp_path / "resumed", overrides)
    proc.wait(timeout=900)
    out = (tmp_path / "resumed" / "output.txt").read_text()
    assert proc.returncode == 0, out[-3000:]
    assert f"resumed from {run / 'checkpoints'}" in out and (run / "export" / "unet_ema.safetensors").is_file()
    killed, resumed = _logged(tmp_path / "killed"), _logged(tmp_path / "resumed")
    seen = []  # (rank, step, keys, shape) of the micro-batches that made the trained model
    for r in (0, 1):
        before = [b for b in killed[r] if b["step"] <= resumed_at][:resumed_at * ACCUM]
        assert [b["keys"] for b in before] == planned[r][:resumed_at * ACCUM]
        assert [b["step"] for b in resumed[r]] == [s for s in range(resumed_at + 1, 6) for _ in range(ACCUM)]
        assert [b["keys"] for b in resumed[r]] == planned[r][resumed_at * ACCUM:]  # the same sequence continues
        seen += [(r, b["step"], b["keys"], tuple(b["shape"])) for b in before + resumed[r]]
    for step in range(1, 6):
        shapes = {shape for _, s, _, shape in seen if s == step}
        assert len(shapes) == 1 and next(iter(shapes))[0] == 2, (step, shapes)  # one bucket on both ranks
    epoch0 = [k for _, s, batch_keys, _ in seen if s <= 3 for k in batch_keys]
    assert sorted(epoch0) == sorted(keys) and not set(epoch0) & held  # none lost, none doubled, none held out
    assert len({shape for *_, shape in seen}) >= 2  # more than one bucket trained
