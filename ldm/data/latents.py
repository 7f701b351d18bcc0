"""Pre-encoded latent shards: the frozen autoencoder's (scaled) latents computed once, read by training.

A latent shard sample holds ``npy`` (float32 latent (C, h, w)), ``txt`` (the caption) and ``json`` (with the image's
original size and crop corner, SDXL's micro-conditions). The folder's index.json records the hash of the encoder
weights and config that made the latents; training refuses a cache whose hash does not match the autoencoder it is
configured with (stale latents train silently wrong).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ldm.data.shards import INDEX_NAME, check_cache_index, write_shards
from ldm.data.stream import dataset_size, make_loader, resolve_shards
from ldm.io import atomic_write_bytes


def folder_hash(folder: str | Path, names: tuple[str, ...] = ("model.safetensors", "config.json")) -> str:
    """SHA-256 over the named files of a model folder (weights and config)."""
    h = hashlib.sha256()
    for name in names:
        path = Path(folder) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (needed to fingerprint the encoder)")
        h.update(name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def encode_latent_shards(data: str, out_dir: str | Path, encode: Callable[[torch.Tensor], torch.Tensor], *,
                         encoder_hash: str, image_size: int, batch_size: int = 64, samples_per_shard: int = 1000,
                         splits: tuple[str, ...] = ("train", "val"), caption: str = "label",
                         progress: bool = True) -> dict:
    """Encode every image of the given splits with ``encode`` ((B,3,H,W) in [-1,1] -> latents) into shards."""
    out = Path(out_dir)
    index: dict = {"splits": {}, "latents": {"encoder_hash": encoder_hash, "image_size": image_size,
                                             "caption": caption, "source": str(data)}}
    for split in splits:
        try:
            urls = resolve_shards(data, split)
        except ValueError:
            continue  # e.g. no validation split
        bar = tqdm(total=dataset_size(data, split), desc=f"latents {split}", unit="img", disable=not progress)

        def samples():
            for batch in make_loader(urls, batch_size=batch_size, image_size=image_size, shuffle_buffer=0,
                                     caption=caption):
                with torch.no_grad():
                    z = encode(batch["image"]).float().cpu().numpy()  # (B, C, h, w)
                for i, (key, cap, latent) in enumerate(zip(batch["key"], batch["caption"], z)):
                    buf = io.BytesIO()
                    np.save(buf, latent.astype(np.float32))
                    meta = {"key": key, "original_size": batch["original_size"][i].int().tolist(),
                            "crop_top_left": batch["crop_top_left"][i].int().tolist()}  # SDXL's micro-conditions
                    yield {"__key__": key, "npy": buf.getvalue(), "txt": cap, "json": json.dumps(meta)}
                bar.update(len(batch["key"]))
                index["latents"]["latent_shape"] = list(z.shape[1:])

        names, counts = write_shards(samples(), out, split, samples_per_shard)
        bar.close()
        index["splits"][split] = {"shards": names, "counts": counts, "total": sum(counts)}
    atomic_write_bytes(out / INDEX_NAME, json.dumps(index, indent=2).encode("utf-8"))  # last: the cache is complete
    return index


def check_latent_cache(spec: str, encoder_hash: str) -> dict:
    """The cache's latents section; ValueError naming both hashes when it was made by another encoder."""
    return check_cache_index(spec, "latents", "encoder_hash", encoder_hash, "latent cache",
                             "re-encode it (ldm-shards latents)")
