"""Training under DeepSpeed: the loop, EMA, checkpoints and resume."""

from ldm.train.trainer import Trainer, deepspeed_config

__all__ = ["Trainer", "deepspeed_config"]
