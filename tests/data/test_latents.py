"""Latent cache: pre-encoded shards equal on-the-fly encoding, training reads them, a stale cache is refused."""

from __future__ import annotations

import shutil

import pytest
import torch

from autoencoder import load_pretrained
from ldm.cli.shards import main as shards_main
from ldm.data import make_loader, resolve_shards
from ldm.data.latents import check_latent_cache, folder_hash


def test_latent_cache_matches_on_the_fly_and_refuses_other_encoders(tmp_path, tiny_shards, tiny_autoencoder):
    out = tmp_path / "latents"
    assert shards_main(["latents", "--data", str(tiny_shards), "--autoencoder", str(tiny_autoencoder),
                        "--out", str(out), "--image-size", "16", "--batch-size", "5",
                        "--samples-per-shard", "7"]) == 0
    ae = load_pretrained(tiny_autoencoder)
    cached = {k: z for b in make_loader(resolve_shards(str(out)), batch_size=4, image_size=16, shuffle_buffer=0,
                                        latents=True) for k, z in zip(b["key"], b["latent"])}
    images = {k: x for b in make_loader(resolve_shards(str(tiny_shards)), batch_size=4, image_size=16,
                                        shuffle_buffer=0) for k, x in zip(b["key"], b["image"])}
    assert cached.keys() == images.keys()
    keys = sorted(images)
    with torch.no_grad():
        fresh = ae.encode(torch.stack([images[k] for k in keys]))  # (N, 4, 8, 8)
        torch.testing.assert_close(torch.stack([cached[k] for k in keys]), fresh, rtol=1e-5, atol=1e-5)
        # and they decode to the same images
        torch.testing.assert_close(ae.decode(torch.stack([cached[k] for k in keys])), ae.decode(fresh),
                                   rtol=1e-4, atol=1e-4)
    info = check_latent_cache(str(out), folder_hash(tiny_autoencoder))
    assert info["latent_shape"] == [4, 8, 8]

    # another encoder (same architecture, different weights) is refused, naming the problem
    other = tmp_path / "other_ae"
    shutil.copytree(tiny_autoencoder, other)
    weights = load_pretrained(other).state_dict()
    from autoencoder import save_pretrained

    retrained = load_pretrained(other)
    retrained.load_state_dict({k: v + 0.01 for k, v in weights.items()})
    save_pretrained(retrained, other)
    with pytest.raises(ValueError, match="re-encode"):
        check_latent_cache(str(out), folder_hash(other))


def test_training_from_cached_latents(tmp_path, tiny_shards, tiny_autoencoder, monkeypatch, trained_steps):
    """Training from the cache never runs the autoencoder's encoder."""
    from autoencoder.model import AutoencoderKL
    from ldm.cli.train import main as train_main
    from tests.conftest import ROOT, tiny_ldm_overrides

    out = tmp_path / "latents"
    assert shards_main(["latents", "--data", str(tiny_shards), "--autoencoder", str(tiny_autoencoder),
                        "--out", str(out), "--image-size", "16"]) == 0
    args = ["--config", str(ROOT / "configs/ldm/emoji.yaml"),
            *tiny_ldm_overrides(tiny_shards, tiny_autoencoder, tmp_path / "run", None), "train.max_steps=2",
            f"data.latents={out}"]
    encoded = []
    real_encode = AutoencoderKL.encode

    def encode(self, *args, **kwargs):
        encoded.append(args[0].shape)
        return real_encode(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", encode)
    assert train_main(args) == 0
    assert trained_steps == [1, 2] and encoded == []  # two steps trained, not one image encoded
    assert (tmp_path / "run" / "export" / "unet_ema.safetensors").exists()

    # the same cache with another autoencoder configured: refused at start, exit 2, naming data.latents
    other = tmp_path / "other_ae"
    retrained = load_pretrained(tiny_autoencoder)
    retrained.load_state_dict({k: v * 1.01 for k, v in retrained.state_dict().items()})
    from autoencoder import save_pretrained

    save_pretrained(retrained, other)
    with pytest.raises(SystemExit) as exc:
        train_main(args + [f"autoencoder.path={other}", f"run.output_dir={tmp_path / 'run2'}"])
    assert exc.value.code == 2
