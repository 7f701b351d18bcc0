"""Frozen text conditioning: encoders behind one interface, the null condition, conditioning dropout."""

from ldm.conditioning.clip import CLIPTextEncoder, OpenCLIPTextEncoder
from ldm.conditioning.text import (
    TEXT_ENCODER_KINDS,
    Cond,
    FrozenTextEncoder,
    HFTextEncoder,
    build_text_encoder,
    conditioning_dropout,
    default_text_encoder_path,
    expand_cond,
    masked_mean,
    null_condition,
)

__all__ = ["CLIPTextEncoder", "Cond", "FrozenTextEncoder", "HFTextEncoder", "OpenCLIPTextEncoder",
           "TEXT_ENCODER_KINDS", "build_text_encoder", "conditioning_dropout", "default_text_encoder_path",
           "expand_cond", "masked_mean", "null_condition"]
