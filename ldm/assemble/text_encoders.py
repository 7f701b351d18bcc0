"""The text encoder section's objects: the frozen encoder (one, SDXL's pair, or a list as one composite) and the
fingerprint a text cache made by it carries."""

from __future__ import annotations

from typing import Any

import torch

from ldm import conditioning
from ldm.config import ConfigError, TextEncoderConfig


def text_encoder_specs(cfg: TextEncoderConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``ldm.conditioning.build_text_encoder``'s arguments for every encoder the section describes (one, SDXL's two,
    SD3's three, or a list): those whose features sit side by side, and those whose tokens follow (SD3's T5)."""
    if cfg.kind == "sdxl":
        return conditioning.sdxl_text_encoders(cfg.path, cfg.max_length), []
    if cfg.kind == "sd3":
        sd3 = conditioning.sd3_text_encoders(cfg.path, cfg.max_length, cfg.t5_max_length)
        return sd3["specs"], sd3["appended"]
    if cfg.encoders is not None:
        return [e.spec(cfg.max_length) for e in cfg.encoders], []
    return [cfg.spec(cfg.max_length)], []


def build_text_encoder(cfg: TextEncoderConfig, device: torch.device | str = "cpu"):
    """The frozen text encoder of the section: one encoder, or a composite (features concatenated, pooled from one or
    more, appended tokens after them)."""
    specs, appended = text_encoder_specs(cfg)
    if cfg.pipeline_layout or cfg.encoders is not None:
        return conditioning.build_text_encoders(specs, device, pooled_from=cfg.pooled_index(), appended=appended)
    return conditioning.build_text_encoder(**specs[0], device=device)


def text_fingerprint(cfg: TextEncoderConfig) -> str:
    """The fingerprint a text cache made by this section's encoder carries: settings and file bytes, no model loads."""
    try:
        specs, appended = text_encoder_specs(cfg)
        return conditioning.files_fingerprint(specs, cfg.null_condition, cfg.pooled_index(), appended)
    except (OSError, ValueError) as e:
        raise ConfigError(f"text_encoder.path: cannot fingerprint the text encoder: {e}") from None
