"""Training: the LDM loop under DeepSpeed and its hooks, the engine, EMA (and power EMA), checkpoints,
guards, pre-emption, exports; the stage-1 autoencoder run. Names are imported lazily, so importing one module
(e.g. ``ldm.train.autoencoder``) does not load DeepSpeed."""

from __future__ import annotations

import importlib

_LAZY = {"Trainer": "ldm.train.trainer", "TrainingDiverged": "ldm.train.guards", "deepspeed_config": "ldm.train.engine",
         "lr_lambda": "ldm.train.engine", "train_stage1": "ldm.train.autoencoder"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ldm.train' has no attribute {name!r}")
