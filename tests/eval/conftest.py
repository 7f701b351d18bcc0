"""Evaluation fixtures: real emoji shards of four visually distinct subcategories, and a tiny TorchScript feature
network that stands in for Inception-v3 (``--inception PATH``) where the metric values themselves are not tested."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest

CLASSES = ("country-flag", "animal-mammal", "face-smiling", "transport-ground")
TRAIN_BASES, VAL_BASES = 4, 2  # distinct emoji per class (each in both styles)


@pytest.fixture(scope="session")
def eval_shards(tmp_path_factory, npm_cache) -> Path:
    """32 px shards of CLASSES: train 4 x 4 emoji x 2 styles (32 images), val 4 x 2 x 2 (16), split by emoji."""
    from ldm.data.emoji import emoji_records, load_rgb
    from ldm.data.shards import encode_png, write_shards
    from ldm.data.decode import resize_center_crop

    records = [r for r in emoji_records(cache_dir=npm_cache)
               if r.label and r.subcategory in CLASSES and r.code == r.base]
    rng = random.Random(0)
    split = {"train": [], "val": []}
    for c in CLASSES:
        # emoji that exist in both styles, so every class has as many images of each style
        bases = sorted(b for b in {r.base for r in records if r.subcategory == c}
                       if sum(r.base == b for r in records) == 2)
        rng.shuffle(bases)
        split["train"] += [r for r in records if r.base in bases[:TRAIN_BASES]]
        split["val"] += [r for r in records if r.base in bases[TRAIN_BASES:TRAIN_BASES + VAL_BASES]]
    out = tmp_path_factory.mktemp("eval_emoji")
    index = {"splits": {}, "image_size": 32}
    for name, recs in split.items():
        samples = ({"__key__": r.key, "png": encode_png(resize_center_crop(load_rgb(r.png), 32)), "txt": r.label,
                    "json": json.dumps(r.metadata()).encode()} for r in recs)
        shards, counts = write_shards(samples, out, name)
        index["splits"][name] = {"shards": shards, "counts": counts, "total": sum(counts)}
    (out / "index.json").write_text(json.dumps(index))
    assert index["splits"]["train"]["total"] == 2 * TRAIN_BASES * len(CLASSES)
    assert index["splits"]["val"]["total"] == 2 * VAL_BASES * len(CLASSES)
    return out


@pytest.fixture(scope="session")
def tiny_inception(tmp_path_factory) -> Path:
    """A traced 2-layer conv net (299 px -> 32-d pooled features) saved as a TorchScript file."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 8, stride=8), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 32, 4, stride=4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    path = tmp_path_factory.mktemp("tiny_inception") / "tiny_features.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, and still what Inception files are
        torch.jit.trace(net.eval(), torch.zeros(1, 3, 299, 299)).save(str(path))
    return path


TINY_CLIP = "ldm-test-tiny-clip"


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny OpenCLIP architecture registered as TINY_CLIP and random weights for it saved to a file."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny_clip")
    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 24, "layers": 1, "width": 32, "head_width": 32, "patch_size": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}}
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{TINY_CLIP}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "clip.safetensors"))
    return folder / "clip.safetensors"


@pytest.fixture(scope="session")
def protocol_shards(tmp_path_factory, npm_cache) -> Path:
    """Real 32 px emoji shards of 150 emoji codes (both styles, about 290 images) for the evaluation protocol."""
    from ldm.data.shards import build_emoji_shards

    out = tmp_path_factory.mktemp("protocol_emoji")
    build_emoji_shards(out, image_size=32, limit=150, val_fraction=0.05, cache_dir=npm_cache)
    return out
