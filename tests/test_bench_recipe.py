"""bench_recipe's time-to-quality arithmetic: when a recipe's curve first reaches the peer's final value."""

from __future__ import annotations

import pytest

from bench.bench_recipe import time_to_reach

CURVE = [{"seconds": 60.0, "fid": 300.0, "class_acc": 0.05}, {"seconds": 120.0, "fid": 200.0, "class_acc": 0.25},
         {"seconds": 180.0, "fid": 150.0, "class_acc": 0.35}]


def test_reached_between_evaluations_is_interpolated():
    assert time_to_reach(CURVE, 250.0, "fid") == pytest.approx(90.0)  # lower is better: halfway from 300 to 200
    assert time_to_reach(CURVE, 0.30, "class_acc") == pytest.approx(150.0)  # higher is better


def test_reached_at_the_first_evaluation_or_never():
    assert time_to_reach(CURVE, 400.0, "fid") == 60.0
    assert time_to_reach(CURVE, 100.0, "fid") is None
    assert time_to_reach(CURVE, 0.5, "class_acc") is None


def test_the_peer_reads_exactly_our_trainers_batches(tiny_shards, tiny_autoencoder, tmp_path):
    """The side-by-side's first condition: diffusers' loop and our trainer see bit-identical batches (latents, text
    embeddings, masks, sample keys) in the same order, from the same cached latents and text embeddings."""
    import torch

    from bench.diffusers_recipe import peer_batches
    from ldm.assemble import assemble
    from ldm.cli.shards import main as shards
    from ldm.config import LDMConfig, load_config
    from ldm.train import Trainer
    from tests.conftest import ROOT, tiny_ldm_overrides

    latents, text = tmp_path / "latents", tmp_path / "text"
    assert shards(["latents", "--data", str(tiny_shards), "--autoencoder", str(tiny_autoencoder), "--out",
                   str(latents), "--image-size", "16"]) == 0
    overrides = [*tiny_ldm_overrides(tiny_shards, tiny_autoencoder, tmp_path / "run", None),
                 f"data.latents={latents}", f"data.text_cache={text}", "data.shuffle_buffer=4"]
    assert shards(["text", "--config", str(ROOT / "configs/ldm/emoji.yaml"), "--data", str(latents), "--out",
                   str(text), *overrides]) == 0
    cfg = load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml", overrides)
    ours = Trainer(cfg)._batches()
    theirs = peer_batches(cfg, assemble(cfg, "cpu", training=True))
    n = 5  # micro-batches of 4 over 10 training samples: the second epoch's reshuffle is compared too
    keys = []
    for _ in range(n):
        batch = next(ours)
        latent, cond, key = next(theirs)
        assert key == list(batch["key"])
        assert torch.equal(latent, batch["latent"])
        for name in ("context", "context_mask"):
            assert torch.equal(cond[name], batch[name]), name
        keys.append(key)
    assert len({k for ks in keys for k in ks}) > 4 and keys[0] != keys[3]  # a real stream, not one batch repeated
