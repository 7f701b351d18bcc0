"""The evaluation protocol of a config: ``cfg.eval`` on ``cfg.data``, its real sets and classifier prepared (from the
cache, else computed and cached) by ``ldm.eval.prepare_evaluator``."""

from __future__ import annotations

from typing import Any

import torch

from ldm.config import ConfigError, LDMConfig
from ldm.eval import Evaluator, prepare_evaluator


def build_evaluator(cfg: LDMConfig, device: torch.device | str = "cpu", progress: bool = True,
                    **overrides: Any) -> Evaluator:
    """The evaluation protocol of ``cfg.eval`` on ``cfg.data``; ``overrides`` replace protocol settings (e.g.
    num_images from the command line). Bad data or settings of the protocol are a ConfigError."""
    e, d = cfg.eval, cfg.data
    settings = dict(data=e.data or d.train, image_size=d.image_size, caption=d.caption, num_images=e.num_images,
                    reference_images=e.reference_images, seed=e.seed, inception=e.inception,
                    classifier=e.classifier, classifier_label=e.classifier_label, bootstrap=e.bootstrap,
                    clip=e.clip, clip_model=e.clip_model, batch_size=e.batch_size, cache_dir=e.cache_dir)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return prepare_evaluator(**settings, device=device, progress=progress)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"eval: {err}") from None
