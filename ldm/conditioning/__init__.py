"""Frozen text conditioning: encoders, the null condition, conditioning dropout."""

from ldm.conditioning.text import (
    Cond,
    HFTextEncoder,
    build_text_encoder,
    conditioning_dropout,
    default_text_encoder_path,
    expand_cond,
    null_condition,
)

__all__ = ["Cond", "HFTextEncoder", "build_text_encoder", "conditioning_dropout", "default_text_encoder_path",
           "expand_cond", "null_condition"]
