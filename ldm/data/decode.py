"""Decoding one raw sample (bytes per field, as WebDataset groups a tar) into tensors: RGB conversion, resizing to
cover a target size with the least crop (the crop's corner and the original size are SDXL's micro-conditions),
captions (the label, or label + tags), cached text embeddings, pre-encoded latents; and collating a batch."""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

CAPTION_MODES = ("label", "label_tags")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
MAX_TAGS = 3


def from_npy(data: bytes, dtype: str = "float32") -> torch.Tensor:
    """A tensor stored as .npy bytes in a recorded dtype (bfloat16 is stored as its uint16 bits)."""
    t = torch.from_numpy(np.load(io.BytesIO(data)))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def pick_cached_text(sample: dict, rng: random.Random) -> tuple[str, dict[str, torch.Tensor]]:
    """One of a text-cache sample's captions (seeded choice) and its cached embeddings, as float32 and bool."""
    info = json.loads(sample["text.json"])
    captions, dtype = info["captions"], info["dtype"]
    i = rng.randrange(len(captions)) if len(captions) > 1 else 0
    out = {"context": from_npy(sample["text_context.npy"], dtype)[i].float(),  # (L, D)
           "context_mask": from_npy(sample["text_mask.npy"])[i].bool()}  # (L,)
    if "text_pooled.npy" in sample:
        out["pooled"] = from_npy(sample["text_pooled.npy"], dtype)[i].float()  # (P,)
    return captions[i], out


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Composite any transparency onto a solid background (white by default); returns RGB."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):  # 16-bit grey: keep the high byte (convert clips)
        grey = np.asarray(image).astype(np.int64).clip(0, 65535) >> 8  # (H, W)
        image = Image.fromarray(grey.astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, background + (255,))
        return Image.alpha_composite(canvas, image).convert("RGB")
    return image.convert("RGB")


def resize_crop(image: Image.Image, width: int, height: int) -> tuple[Image.Image, tuple[int, int]]:
    """Resize to cover width x height with the least crop (Lanczos, antialiased when shrinking), crop the centre:
    the image and the (top, left) of the crop in the resized image (SDXL's crop micro-condition)."""
    w, h = image.size
    if (w, h) == (width, height):
        return image, (0, 0)
    scale = max(width / w, height / h)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - width) // 2, (nh - height) // 2
    return image.crop((left, top, left + width, top + height)), (top, left)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the short side to size (Lanczos, antialiased when shrinking) and crop the centre square."""
    return resize_crop(image, size, size)[0]


def pick_caption(sample: dict, mode: str) -> str:
    """Caption text of a raw sample: its `txt`, plus up to 3 tags from `json` in "label_tags" mode."""
    label = sample["txt"].decode("utf-8").strip() if "txt" in sample else ""
    if not label:
        raise ValueError("missing or empty caption")
    if mode == "label_tags" and "json" in sample:
        words = set(label.lower().replace(":", " ").replace(",", " ").split())
        tags = [t for t in json.loads(sample["json"]).get("tags", []) if t.lower() not in words]
        label = ", ".join([label] + tags[:MAX_TAGS])
    return label


@dataclass
class Decoded:
    """One decoded sample: pixels (3, H, W) in [-1, 1] or a latent (C, h, w), its caption, the cached text embeddings
    (None without a text cache), and its size before resizing and crop corner, each (h, w) / (top, left) pixels."""

    key: str
    tensor: torch.Tensor
    caption: str
    text: dict[str, torch.Tensor] | None
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


def decode_sample(sample: dict, rng: random.Random, *, width: int, height: int, caption: str = "label",
                  text: bool = False, latents: bool = False, flip: bool = False) -> Decoded:
    """A raw sample (bytes per field) -> Decoded, the image resized to cover width x height and centre-cropped;
    raises on a bad sample. A latent's original size and crop come from its json (else: the target, uncropped)."""
    embeddings = None
    if text:
        if "text.json" not in sample:
            raise ValueError("no cached text embeddings (text.json) in sample")
        label, embeddings = pick_cached_text(sample, rng)
    else:
        label = pick_caption(sample, caption)
    if latents:
        if "npy" not in sample:
            raise ValueError("no latent (npy) in sample")
        meta = json.loads(sample["json"]) if "json" in sample else {}
        original, crop = meta.get("original_size", (height, width)), meta.get("crop_top_left", (0, 0))
        latent = torch.from_numpy(np.load(io.BytesIO(sample["npy"])))  # (C, h, w)
        return Decoded(sample["__key__"], latent, label, embeddings, tuple(original), tuple(crop))
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise ValueError("no image in sample")
    with Image.open(io.BytesIO(sample[ext])) as image:
        image.load()
        original = (image.height, image.width)
        image, crop = resize_crop(to_rgb(image), width, height)
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (H, W, 3)
    return Decoded(sample["__key__"], pixels.permute(2, 0, 1).float().div(127.5).sub(1.0), label, embeddings,
                   original, crop)  # (3, H, W)


def collate(decoded: list[Decoded], *, latents: bool, skipped: int, worker: int) -> dict:
    """One batch dict: image (B, 3, H, W) or latent (B, C, h, w), caption, key, original_size and crop_top_left (B, 2),
    skipped, worker; with cached text also context (B, L, D), context_mask (B, L)[, pooled (B, P)]."""
    batch = {"latent" if latents else "image": torch.stack([d.tensor for d in decoded]),
             "caption": [d.caption for d in decoded], "key": [d.key for d in decoded],
             "original_size": torch.tensor([d.original_size for d in decoded], dtype=torch.float32),  # (B, 2)
             "crop_top_left": torch.tensor([d.crop_top_left for d in decoded], dtype=torch.float32),  # (B, 2)
             "skipped": skipped, "worker": worker}
    if decoded[0].text is not None:
        batch.update({k: torch.stack([d.text[k] for d in decoded]) for k in decoded[0].text})  # (B, ...)
    return batch
