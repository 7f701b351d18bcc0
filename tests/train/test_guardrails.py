"""Numerical guardrails: a non-finite loss is skipped and counted; repeated ones roll back, then stop clearly."""

from __future__ import annotations

import logging

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


def _record_rollbacks(monkeypatch, tr) -> list[dict]:
    """For each rollback that happens: the trainer's step, weights and EMA right after it, the checkpoint it rolled
    back to (read from its files at that moment, before pruning can remove it) and the weights right before it."""
    from ldm.train.checkpoint import read_weights

    records, real = [], tr._roll_back

    def roll_back(reason):
        before = {n: p.detach().clone() for n, p in tr.engine.module.named_parameters()}
        real(reason)
        raw, ema, tag = read_weights(tr.checkpointer.root)
        records.append({"reason": reason, "step": tr.step, "tag": tag, "before": before, "ckpt_raw": raw,
                        "ckpt_ema": ema, "raw": {n: p.detach().clone() for n, p in tr.engine.module.named_parameters()},
                        "ema": {n: t.clone() for n, t in tr.ema.state_dict().items()}})

    monkeypatch.setattr(tr, "_roll_back", roll_back)
    return records


def _assert_restored(record: dict, step: int) -> None:
    """The rollback restored the checkpoint of ``step``: step counter, raw weights and EMA, all of them exactly."""
    assert record["tag"] == f"step{step:08d}" and record["step"] == step, (record["tag"], record["step"])
    assert record["raw"].keys() <= record["ckpt_raw"].keys()
    assert all(torch.equal(p, record["ckpt_raw"][n]) for n, p in record["raw"].items())
    assert record["ema"].keys() == record["ckpt_ema"].keys()
    assert all(torch.equal(t, record["ckpt_ema"][n]) for n, t in record["ema"].items())
    # the run had moved on from the checkpoint (otherwise the comparison above would prove nothing)
    assert any(not torch.equal(p, record["ckpt_raw"][n]) for n, p in record["before"].items())


def test_repeated_nan_rolls_back_then_stops(tmp_path, tiny_shards, tiny_autoencoder, monkeypatch, caplog):
    _poison(monkeypatch, lambda n: n >= 3)  # steps 1-2 are fine and checkpointed, then every loss is NaN
    tr = _trainer(tmp_path, tiny_shards, tiny_autoencoder, "train.max_steps=10", "train.ckpt_every=2",
                  "train.max_bad_steps=2", "train.max_rollbacks=1")
    rollbacks = _record_rollbacks(monkeypatch, tr)
    # steps 3-4 bad: back to step 2; steps 3-4 bad again (the restored counter makes it step 4 once more): stop
    with caplog.at_level(logging.WARNING, logger="ldm.train.trainer"), pytest.raises(
            trainer_mod.TrainingDiverged, match=r"non-finite loss in 2 consecutive steps at step 4; already rolled back 1"):
        tr.train()
    assert tr.rollbacks == 1 and len(rollbacks) == 1
    _assert_restored(rollbacks[0], 2)
    assert "non-finite loss in 2 consecutive steps at step 4: rolled back to step00000002 (rollback 1 of 1)" in caplog.text
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert latest == "step00000002"  # nothing was checkpointed after the losses went bad
    for p in tr.engine.module.parameters():
        assert torch.isfinite(p).all()


def test_nonfinite_weights_are_never_checkpointed_but_rolled_back(tmp_path, tiny_shards, tiny_autoencoder,
                                                                  monkeypatch, caplog):
    """Weights that went non-finite by step 4 (its loss was finite) are not saved: the checkpoint at step 4 rolls back
    to step 2 instead, and the run trains steps 3-6 again to a finite end."""
    tr = _trainer(tmp_path, tiny_shards, tiny_autoencoder, "train.max_steps=6", "train.ckpt_every=2",
                  "train.max_rollbacks=1")
    rollbacks = _record_rollbacks(monkeypatch, tr)
    real_step, steps = tr.micro_step, []

    def micro_step(batch):
        steps.append(tr.step + 1)
        loss = real_step(batch)
        if len(steps) == 4:  # once: after step 4's update, a weight becomes NaN
            with torch.no_grad():
                next(tr.engine.module.parameters()).view(-1)[0] = float("nan")
        return loss

    monkeypatch.setattr(tr, "micro_step", micro_step)
    with caplog.at_level(logging.WARNING, logger="ldm.train.trainer"):
        result = tr.train()
    assert result["step"] == 6 and tr.rollbacks == 1 and len(rollbacks) == 1
    assert rollbacks[0]["reason"] == "non-finite weights"
    _assert_restored(rollbacks[0], 2)
    assert "non-finite weights at step 4: rolled back to step00000002 (rollback 1 of 1)" in caplog.text
    assert steps == [1, 2, 3, 4, 3, 4, 5, 6]
    from ldm.train.checkpoint import read_weights

    for tag in ("step00000004", "step00000006"):  # both written after the rollback, from finite weights
        raw, ema, _ = read_weights(tmp_path / "run" / "checkpoints", tag)
        assert all(torch.isfinite(t).all() for t in [*raw.values(), *ema.values()]), tag
