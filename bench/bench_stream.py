"""Benchmark P3: the data stream's throughput against the trainer's consumption rate.

1. Stream: samples/s of `make_loader` over one pass of the train split, from image shards (decode, RGB,
   resize/crop, batch) and from cached-latent shards (built here into a temp dir with the trained autoencoder,
   the code `ldm-shards latents` runs), with 0 (in-process, the config default), 1 and 2 DataLoader workers.
2. Consumption: the trainer's time per optimizer step at the given config (default configs/ldm/emoji.yaml: its
   model preset, batch size, DeepSpeed settings), built by `Trainer` itself: `micro_step` (frozen encoders,
   loss, backward, DeepSpeed step) plus the per-step weight check and EMA update of its loop, on batches already
   in memory. Text embeddings are memoised by the trainer, so the first epoch (cold cache) is slower than every
   later one (warm); both are measured.
3. End to end: training steps/s reading the stream inside the loop (the trainer's `_batches`), with cached
   latents vs encoding the images on the fly.

Ratios are stream rate / consumption rate (warm text cache, matching path): above 1 the stream keeps up.
Every row gives wall time and CPU time (this process plus its finished DataLoader workers): on a shared
machine the wall time grows with other people's load, the CPU time much less. Torch runs on `--threads`
threads (default 1: two busy processes on two cores with two threads each slow down many-fold).

    .venv/bin/python -m bench.bench_stream --data /tmp/fresh/data/emoji --autoencoder /tmp/fresh/runs/autoencoder
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

import torch  # noqa: E402

from ldm.data import dataset_size, make_loader, resolve_shards  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have exited (DataLoader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def stream_rate(urls: list[str], *, latents: bool, workers: int, batch_size: int, image_size: int,
                shuffle_buffer: int) -> tuple[float, float, int]:
    """(wall s, CPU s, samples) of one full pass of the stream, worker start-up included."""
    loader = make_loader(urls, batch_size=batch_size, image_size=image_size, num_workers=workers,
                         shuffle_buffer=shuffle_buffer, latents=latents)
    n, start, cpu = 0, time.perf_counter(), cpu_seconds()
    for batch in loader:
        n += len(batch["key"])
    return time.perf_counter() - start, cpu_seconds() - cpu, n


def build_latents(data: str, autoencoder: str, out: Path, image_size: int, batch_size: int) -> tuple[float, dict]:
    """Encode the train split into latent shards (what `ldm-shards latents` does); returns (seconds, index)."""
    from autoencoder import load_pretrained
    from ldm.data.latents import encode_latent_shards, folder_hash

    ae = load_pretrained(autoencoder)
    start = time.perf_counter()
    index = encode_latent_shards(data, out, ae.encode, encoder_hash=folder_hash(autoencoder), image_size=image_size,
                                 batch_size=batch_size, splits=("train",), progress=True)
    return time.perf_counter() - start, index


def step(trainer, batch: dict) -> None:
    """One optimizer step of the trainer's loop (grad_accum 1), minus logging and checkpoints."""
    trainer.micro_step(batch)
    trainer.weights_finite()
    trainer.step += 1
    trainer.ema.update(trainer.step)


def timed(fn) -> tuple[float, float]:
    """(wall s, CPU s) of one call."""
    start, start_cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - start, cpu_seconds() - start_cpu


def step_seconds(trainer, batches: dict[str, list[dict]]) -> dict[str, tuple[float, float]]:
    """Median (wall s, CPU s) of one step per kind of in-memory batches, the kinds alternating step by step."""
    times: dict[str, list[tuple[float, float]]] = {kind: [] for kind in batches}
    for group in zip(*batches.values()):
        for kind, batch in zip(batches, group):
            times[kind].append(timed(lambda: step(trainer, batch)))
    return {kind: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for kind, t in times.items()}


def end_to_end(trainer, latent_dir: str, warmup: int, steps: int, block: int = 4) -> dict[str, tuple[float, float]]:
    """(wall s, CPU s) per step of the trainer's own stream (`_batches`) feeding `step`, on-the-fly encoding vs
    cached latents, alternating blocks of steps so that changes in the machine's load hit both alike."""
    streams = {}
    for kind, latents in (("images", None), ("latents", latent_dir)):
        trainer.cfg.data.latents = latents  # read once when the stream starts; the hash was checked at start-up
        trainer.epoch, trainer.epoch_batches = 0, 0  # (no epoch boundary is reached within these few steps)
        streams[kind] = trainer._batches()
        for _ in range(warmup):  # worker start-up and the first fill of the shuffle buffer
            step(trainer, next(streams[kind]))
    totals = {kind: [0.0, 0.0] for kind in streams}
    for _ in range(max(1, steps // block)):
        for kind, batches in streams.items():
            wall, cpu = timed(lambda: [step(trainer, next(batches)) for _ in range(block)])
            totals[kind][0] += wall
            totals[kind][1] += cpu
    n = max(1, steps // block) * block
    return {kind: (wall / n, cpu / n) for kind, (wall, cpu) in totals.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/tmp/fresh/data/emoji", help="image shards (folder with index.json)")
    parser.add_argument("--autoencoder", default="/tmp/fresh/runs/autoencoder", help="trained autoencoder folder")
    parser.add_argument("--config", default=str(ROOT / "configs/ldm/emoji.yaml"), help="LDM config (model, batch)")
    parser.add_argument("--workers", default="0,1,2", help="DataLoader worker counts for the stream passes")
    parser.add_argument("--steps", type=int, default=16, help="timed steps per consumption / end-to-end measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each end-to-end measurement")
    args = parser.parse_args(argv)
    for path, what in ((args.data, "--data"), (args.autoencoder, "--autoencoder"), (args.config, "--config")):
        if not Path(path).exists():
            parser.error(f"{what} {path} not found")

    from ldm.config import LDMConfig, load_config
    from ldm.train.trainer import Trainer

    workers = [int(w) for w in args.workers.split(",")]
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="bench_stream_")
    latent_dir = Path(tmp.name) / "latents"
    overrides = [f"data.train={args.data}", f"data.val={args.data}", f"autoencoder.path={args.autoencoder}",
                 f"data.latents={latent_dir}", f"run.output_dir={Path(tmp.name) / 'run'}", "tracking.enabled=false"]
    cfg = load_config(LDMConfig, args.config, overrides)
    d = cfg.data
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; torch threads {torch.get_num_threads()}")

    encode_s, index = build_latents(args.data, args.autoencoder, latent_dir, d.image_size, 64)
    total = index["splits"]["train"]["total"]
    print(f"latent cache: {total} samples encoded in {encode_s:.1f} s ({total / encode_s:.0f} samples/s), "
          f"latent {index['latents']['latent_shape']}")

    image_urls, latent_urls = resolve_shards(args.data, "train"), resolve_shards(str(latent_dir), "train")
    streams = {}
    for kind, urls in (("images", image_urls), ("latents", latent_urls)):
        for w in workers:
            wall, cpu, n = stream_rate(urls, latents=kind == "latents", workers=w, batch_size=d.batch_size,
                                       image_size=d.image_size, shuffle_buffer=d.shuffle_buffer)
            assert n == dataset_size(args.data, "train"), (kind, n)
            streams[kind, w] = (wall / n * d.batch_size, cpu / n * d.batch_size)  # seconds per batch
            print(f"stream {kind:7s} {w} workers: {n / wall:8.0f} samples/s")

    trainer = Trainer(cfg)
    torch.set_num_threads(args.threads)  # init_distributed gave it one per core
    try:
        image_batches = [b for _, b in zip(range(args.steps), make_loader(
            image_urls, batch_size=d.batch_size, image_size=d.image_size, shuffle_buffer=d.shuffle_buffer))]
        latent_batches = [b for _, b in zip(range(args.steps), make_loader(
            latent_urls, batch_size=d.batch_size, image_size=d.image_size, shuffle_buffer=d.shuffle_buffer,
            latents=True))]
        step(trainer, image_batches[0])  # first-call overheads (allocations, DeepSpeed bookkeeping)
        cold = step_seconds(trainer, {"images": image_batches[1:]})["images"]  # unseen captions: text encoder runs
        captions = sorted({c for b in make_loader(image_urls, batch_size=256, image_size=d.image_size,
                                                  shuffle_buffer=0) for c in b["caption"]})
        for i in range(0, len(captions), 256):  # what the first epoch leaves in the trainer's text cache
            with torch.no_grad():
                trainer.encode_captions(captions[i:i + 256])
        warm = step_seconds(trainer, {"images": image_batches, "latents": latent_batches})
        e2e = end_to_end(trainer, str(latent_dir), args.warmup, args.steps)
    finally:
        trainer.stop.restore()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        tmp.cleanup()

    b = d.batch_size
    rows = {("stream", kind, w): streams[kind, w] for kind in ("images", "latents") for w in workers}
    rows["step", "images", "cold"] = cold
    rows.update({("step", kind, "warm"): warm[kind] for kind in warm})
    rows.update({("e2e", kind, d.num_workers): e2e[kind] for kind in e2e})
    names = {"images": "on-the-fly encoding", "latents": "cached latents"}
    print(f"\nconfig {args.config}: preset {cfg.model.preset}, batch {b}, {d.image_size} px, "
          f"ZeRO {cfg.train.zero_stage} {cfg.train.precision}, data.num_workers {d.num_workers}; {total} train "
          f"samples; torch threads {args.threads}; load average {os.getloadavg()[0]:.2f}\n")
    print(f"{'measurement (per batch of ' + str(b) + ')':54s} {'samples/s':>9s} {'wall ms':>8s} {'CPU ms':>8s} "
          f"{'stream / consumption':>21s}")
    for (what, kind, extra), (wall, cpu) in rows.items():
        if what == "stream":
            label = f"stream, {'image shards (decode)' if kind == 'images' else 'cached latents'}, {extra} workers"
            consume_wall, consume_cpu = rows["step", kind, "warm"]
            ratio = f"{consume_wall / wall:8.0f}x wall {consume_cpu / cpu:6.0f}x CPU"
        elif what == "step":
            label, ratio = f"trainer step, {names[kind]}, text cache {extra}", ""
        else:
            label, ratio = f"end to end, {names[kind]}, {extra} workers ({1 / wall:.2f} steps/s)", ""
        print(f"{label:54s} {b / wall:9.0f} {1000 * wall:8.1f} {1000 * cpu:8.1f} {ratio}")
    print(f"\nend to end steps/s, cached latents / on-the-fly encoding: {e2e['images'][0] / e2e['latents'][0]:.2f}x "
          f"(CPU time {e2e['images'][1] / e2e['latents'][1]:.2f}x)")
    return {f"{what}_{kind}_{extra}": b / wall for (what, kind, extra), (wall, _) in rows.items()}


if __name__ == "__main__":
    main(sys.argv[1:])
