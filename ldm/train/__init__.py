"""Training under DeepSpeed: the loop and its hooks, the engine, EMA, checkpoints, data position, guards, pre-emption."""

from ldm.train.engine import deepspeed_config, lr_lambda
from ldm.train.trainer import Trainer, TrainingDiverged

__all__ = ["Trainer", "TrainingDiverged", "deepspeed_config", "lr_lambda"]
