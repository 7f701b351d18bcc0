"""Numerical guardrails: a non-finite loss is skipped and counted; repeated ones roll back, then stop clearly."""

from __future__ import annotations

import pytest
import torch

import ldm.assemble.components as assemble_mod
import ldm.train.trainer as trainer_mod
from ldm.config import LDMConfig, load_config
from tests.conftest import ROOT, tiny_ldm_overrides


def _trainer(tmp_path, tiny_shards, tiny_autoencoder, *extra):
    cfg = load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml",
                      [*tiny_ldm_overrides(tiny_shards, tiny_autoencoder, tmp_path / "run", None), *extra])
    return trainer_mod.Trainer(cfg)


def _poison(monkeypatch, bad_calls):
    """Make the training objective return NaN on the given (1-based) calls."""
    real_build, calls = assemble_mod.build_objective, []

    def build(cfg, process):
        real = real_build(cfg, process)

        def loss(*args, **kwargs):
            calls.append(1)
            value = real(*args, **kwargs)
            return value * float("nan") if bad_calls(len(calls)) else value

        return loss

    monkeypatch.setattr(assemble_mod, "build_objective", build)


def test_single_nan_is_skipped_and_counted(tmp_path, tiny_shards, tiny_autoencoder, monkeypatch):
    _poison(monkeypatch, lambda n: n == 2)
    tr = _trainer(tmp_path, tiny_shards, tiny_autoencoder, "train.max_steps=3", "train.ckpt_every=3")
    before = {n: p.detach().clone() for n, p in tr.engine.module.named_parameters()}
    result = tr.train()
    assert result["step"] == 3 and tr.nonfinite_steps == 1 and tr.rollbacks == 0
    for n, p in tr.engine.module.named_parameters():
        assert torch.isfinite(p).all(), n
    assert any(not torch.equal(before[n], p) for n, p in tr.engine.module.named_parameters())


def test_repeated_nan_rolls_back_then_stops(tmp_path, tiny_shards, tiny_autoencoder, monkeypatch):
    _poison(monkeypatch, lambda n: n >= 3)  # steps 1-2 are fine and checkpointed, then every loss is NaN
    tr = _trainer(tmp_path, tiny_shards, tiny_autoencoder, "train.max_steps=10", "train.ckpt_every=2",
                  "train.max_bad_steps=2", "train.max_rollbacks=1")
    with pytest.raises(trainer_mod.TrainingDiverged, match=r"non-finite loss in 2 consecutive steps.*rolled back 1"):
        tr.train()
    assert tr.rollbacks == 1
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert latest == "step00000002"  # nothing was checkpointed after the losses went bad
    for p in tr.engine.module.parameters():
        assert torch.isfinite(p).all()
