"""Benchmark: the trainer's step rate from cached latents + cached text embeddings against encoding on the fly.

At --image-size (default 256) px with an SD-shaped autoencoder (KL-f8: 128/256/512/512 channels, 2 ResNet blocks per
level, 4 latent channels) and a CLIP-shaped text encoder (CLIP ViT-L/14's text tower: 12 layers, 768 wide, 77
tokens), both with random weights (the cost of a forward does not depend on the weights), the real `Trainer` trains
the same UNet three ways in this process:

    on the fly      image shards: decode + resize, the autoencoder encodes, the text encoder encodes each caption
    latents         `ldm-shards latents` shards: the text encoder still runs
    latents + text  `ldm-shards text` over the latent shards: neither encoder runs (none is even built)

Every caption is new to the trainer (one epoch, unique captions), so its per-process memo never helps the on-the-fly
runs. A step's time is the interval between consecutive `micro_step` starts (data loading, encoding, forward,
backward, optimizer and EMA included; grad_accum 1); the first --warmup steps are left out (a fresh process's first
steps fault their memory in). glibc keeps freed memory, as every `ldm-*` command sets it. Wall and CPU time are given:
on a shared machine the wall time grows with other people's load. The UNet is small (--unet, default emoji-cpu) so
the benchmark runs in minutes on 2 CPU cores; a bigger UNet lowers the ratio, as the encoders' share falls.

    .venv/bin/python -m bench.bench_cache --images 16 --steps 5 --warmup 2 --batch-size 2 --json bench/results/cache.json
"""

from __future__ import annotations

import argparse
import io
import json
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

# what the step times depend on (bench/provenance.py: a change to these after the results' commit makes them stale)
MEASURES = ["bench/bench_cache.py", "ldm/train/trainer.py", "ldm/data/run_stream.py", "ldm/data/stream.py",
            "ldm/data/decode.py", "ldm/data/latents.py", "ldm/data/text_cache.py", "ldm/conditioning/base.py",
            "ldm/conditioning/cache.py", "ldm/conditioning/hf.py", "ldm/conditioning/clip.py", "autoencoder/model.py",
            "ldm/models/unet.py", "ldm/models/blocks.py", "ldm/models/attention.py"]
WORDS = "red green blue small large happy sad cat dog apple heart star face hat tree house car boat sun moon".split()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def char_tokenizer(max_length: int):
    """A CLIP tokenizer over single bytes (no merges): CLIP's interface and padding, built offline."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = sorted(set(bytes_to_unicode().values()))
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def build_models(folder: Path) -> tuple[Path, Path]:
    """The SD-shaped autoencoder folder and a CLIP-ViT-L-shaped text encoder folder, random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from autoencoder import AutoencoderKL, save_pretrained

    torch.manual_seed(0)
    ae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                       norm_num_groups=32, scale_factor=0.18215)
    save_pretrained(ae, folder / "autoencoder")
    tokenizer = char_tokenizer(77)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    CLIPTextModel(config).save_pretrained(folder / "clip" / "text_encoder")
    tokenizer.save_pretrained(folder / "clip" / "tokenizer")
    return folder / "autoencoder", folder / "clip"


def write_images(folder: Path, n: int, size: int) -> None:
    """n smooth random images with unique ~12-word captions, as train shards with an index.json."""
    from PIL import Image

    from ldm.data.shards import encode_png, write_shards

    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC)
        caption = f"image {i}: " + " ".join(rng.choice(WORDS, 10))
        samples.append({"__key__": f"s{i:05d}", "png": encode_png(image), "txt": caption, "json": "{}"})
    names, counts = write_shards(samples, folder, "train", samples_per_shard=max(1, n // 2))
    index = {"splits": {"train": {"shards": names, "counts": counts, "total": sum(counts)}}, "image_size": size}
    (folder / "index.json").write_text(json.dumps(index))


def train(overrides: list[str], warmup: int) -> dict:
    """Train with the real Trainer; (wall, CPU) seconds per step from consecutive micro_step starts."""
    import contextlib

    import ldm.train.trainer as trainer_mod
    from ldm.config import LDMConfig, load_config

    cfg = load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml", overrides)
    marks, real = [], trainer_mod.Trainer.micro_step

    def timed(self, batch):
        marks.append((time.perf_counter(), cpu_seconds()))
        return real(self, batch)

    trainer_mod.Trainer.micro_step = timed
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            trainer = trainer_mod.Trainer(cfg)
            built = trainer.parts.text_encoder.loaded
            trainer.train()
    finally:
        trainer_mod.Trainer.micro_step = real
    walls = [b[0] - a[0] for a, b in zip(marks[warmup:], marks[warmup + 1:])]
    cpus = [b[1] - a[1] for a, b in zip(marks[warmup:], marks[warmup + 1:])]
    return {"wall": statistics.median(walls), "cpu": statistics.median(cpus), "steps": len(walls),
            "text_encoder_built_for_training": built}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--images", type=int, default=16, help="training images (each caption seen once per epoch)")
    p.add_argument("--steps", type=int, default=5, help="steps timed per way (after the warm-up steps)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out at the start of each way")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--unet", default="emoji-cpu", help="UNet preset (its context width becomes CLIP's 768)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if (args.steps + args.warmup + 1) * args.batch_size > args.images:
        p.error("--images must cover (--steps + --warmup + 1) x --batch-size samples: every caption is new to the "
                "trainer")
    from ldm.assemble import build_text_encoder, text_fingerprint
    from ldm.conditioning import null_condition
    from ldm.config import LDMConfig, load_config
    from ldm.data.latents import encode_latent_shards, folder_hash
    from ldm.data.text_cache import encode_text_shards

    from ldm.cli._common import retain_freed_memory

    from bench.provenance import record

    retain_freed_memory()
    torch.set_num_threads(args.threads)
    prov = record(MEASURES, args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        autoencoder, clip = build_models(tmp)
        write_images(tmp / "images", args.images, args.image_size)
        base = [f"autoencoder.path={autoencoder}", "text_encoder.kind=clip", f"text_encoder.path={clip}",
                "text_encoder.max_length=77", f"data.train={tmp / 'images'}", "data.val=null",
                f"data.image_size={args.image_size}", f"data.batch_size={args.batch_size}", "data.shuffle_buffer=0",
                f"model.preset={args.unet}", f"train.max_steps={args.steps + args.warmup + 1}",
                "train.warmup_steps=1", f"train.ckpt_every={args.steps + args.warmup + 1}", "train.log_every=1000",
                "sampling.steps=1", "sampling.prompts=[x]", "sampling.images_per_prompt=1", "tracking.enabled=false",
                "train.val_every=0", "eval.final=false"]  # no held-out split here: the step rate alone
        cfg = load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml", base)
        from autoencoder import load_pretrained

        start = time.perf_counter()
        ae = load_pretrained(autoencoder)
        encode_latent_shards(str(tmp / "images"), tmp / "latents", lambda x: ae.encode(x), encoder_hash=folder_hash(
            autoencoder), image_size=args.image_size, batch_size=args.batch_size, splits=("train",), progress=False)
        latent_time = time.perf_counter() - start
        start = time.perf_counter()
        encoder = build_text_encoder(cfg.text_encoder)
        encode_text_shards(str(tmp / "latents"), tmp / "text", encoder, fingerprint=text_fingerprint(cfg.text_encoder),
                           null_cond=null_condition(encoder), batch_size=args.batch_size, splits=("train",),
                           progress=False)
        text_time = time.perf_counter() - start
        results = {}
        for name, extra in (("on the fly", []), ("latents", [f"data.latents={tmp / 'latents'}"]),
                            ("latents + text", [f"data.text_cache={tmp / 'text'}"])):
            results[name] = train([*base, f"run.output_dir={tmp / name.replace(' ', '_')}", *extra], args.warmup)
            print(f"{name:15s} {results[name]['wall']:7.3f} s/step wall  {results[name]['cpu']:7.3f} s/step CPU  "
                  f"({results[name]['steps']} steps; text encoder built for training: "
                  f"{results[name]['text_encoder_built_for_training']})", flush=True)
    fly = results["on the fly"]
    for name in ("latents", "latents + text"):
        r = results[name]
        r["speedup_wall"], r["speedup_cpu"] = fly["wall"] / r["wall"], fly["cpu"] / r["cpu"]
        print(f"{name:15s} x{r['speedup_wall']:.1f} faster than on the fly (wall), x{r['speedup_cpu']:.1f} (CPU)")
    print(f"one-time cost of the caches for {args.images} images: latents {latent_time:.1f} s, text {text_time:.1f} s")
    print(f"settings: {args.image_size} px, batch {args.batch_size}, UNet {args.unet}, {args.threads} threads, "
          f"torch {torch.__version__}")
    if args.json:
        Path(args.json).write_text(json.dumps({"provenance": prov, "args": vars(args), "results": results,
                                               "cache_seconds": {"latents": latent_time, "text": text_time}},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
