"""An img2dataset-style folder (numbered tars, no index.json) as data.train: trained end to end with a validation part
held out by key hash (data.val_fraction): the held-out keys never reach a training step, and the held-out loss is
computed on exactly them."""

from __future__ import annotations

import ldm.train.trainer as trainer_mod
from ldm.cli.train import main as train_main
from tests.conftest import ROOT, tiny_ldm_overrides
from tests.data.test_buckets import write_mixed_folder


def test_img2dataset_folder_trains_with_a_key_hash_holdout(tmp_path, tiny_shards, tiny_autoencoder, monkeypatch):
    import ldm.train.hooks as hooks

    train_keys, val_keys = write_mixed_folder(tmp_path / "downloads", train=16, val_fraction=0.3)
    assert len(val_keys) >= 2
    trained, held = [], []
    real_step, real_init = trainer_mod.Trainer.micro_step, hooks.HeldOutLoss.__init__

    def step(self, batch):
        trained.extend(batch["key"])
        return real_step(self, batch)

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        held.extend(self.keys)

    monkeypatch.setattr(trainer_mod.Trainer, "micro_step", step)
    monkeypatch.setattr(hooks.HeldOutLoss, "__init__", init)
    out = tmp_path / "run"
    overrides = [*tiny_ldm_overrides(tiny_shards, tiny_autoencoder, out, None), f"data.train={tmp_path / 'downloads'}",
                 "data.val=null", "data.val_fraction=0.3", "train.max_steps=4", "train.val_every=2",
                 "train.val_bands=2"]
    assert train_main(["--config", str(ROOT / "configs/ldm/emoji.yaml"), *overrides]) == 0
    assert len(trained) == 4 * 4 and set(trained) <= train_keys  # 4 steps of 4, all from the training part
    assert sorted(held) == sorted(val_keys)  # the held-out loss sees exactly the held-out keys
    assert (out / "export" / "unet_ema.safetensors").is_file()
    import torch

    state = torch.load(out / "checkpoints" / "step00000004" / "trainer_rank0.pt", weights_only=False)
    assert (state["epoch"], state["epoch_batches"]) == (1, 0)  # 16 training keys: an epoch is 4 batches of 4
