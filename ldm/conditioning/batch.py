"""The condition of a training batch: its text (cached embeddings, or the frozen encoder's of its captions), SDXL's
size/crop ids when the network takes them, and conditioning dropout to the null condition (Ho & Salimans 2022).

The trainer conditions each micro-batch here and the held-out loss its held-out samples (and the padding forwards
that keep ranks in step), so both see exactly what a training step sees.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ldm.conditioning.base import Cond
from ldm.conditioning.micro import micro_conditions
from ldm.diffusion.rng import rand, to_device

Tensor = torch.Tensor
CACHED_TEXT = ("context", "context_mask", "pooled")  # what a text cache's samples carry instead of an encoding


@dataclass
class BatchConditioning:
    """How a run conditions its samples: text from a cache or the encoder, size/crop ids when the network takes them."""

    text_encoder: Callable[[list[str]], Cond]  # captions -> (B, L, D), (B, L)[, (B, P)]
    null_cond: Cond  # (1, L, D)...: the null condition (dropout's, and a padding sample's)
    device: torch.device
    micro_conditioned: bool  # the network embeds SDXL's size/crop ids (time_ids)
    downsample_factor: int  # image pixels per latent pixel

    def __call__(self, samples: Mapping[str, Any], latents: Tensor) -> Cond:
        """The condition of samples on the device: ``samples`` holds their cached text (``CACHED_TEXT``) or their
        ``caption``s, and may hold ``original_size`` / ``crop_top_left`` (B, 2); ``latents`` (B, C, h, w) are theirs."""
        if "context" in samples:  # from a text cache
            text = {k: samples[k] for k in CACHED_TEXT if k in samples}
        else:
            text = self.text_encoder(samples["caption"])  # (B, L, D), (B, L)[, (B, P)]
        return self._sized(text, latents, samples)

    def null(self, latents: Tensor) -> Cond:
        """The null condition of samples with these latents (B, C, h, w): uncropped at the trained size."""
        return self._sized(self.null_cond, latents, {})

    def _sized(self, text: Cond, latents: Tensor, samples: Mapping[str, Any]) -> Cond:
        """The text on the device, with SDXL's time_ids (B, 6) when the network takes them (defaults: uncropped,
        original size = the size trained at)."""
        cond = {k: v.to(self.device) for k, v in text.items()}
        if self.micro_conditioned:
            size = (latents.shape[-2] * self.downsample_factor, latents.shape[-1] * self.downsample_factor)  # (H, W)
            cond["time_ids"] = micro_conditions(samples.get("original_size", size),
                                                samples.get("crop_top_left", (0, 0)), size,
                                                batch=latents.shape[0]).to(self.device)  # (B, 6)
        return cond


def conditioning_dropout(cond: Cond, null: Cond, p: float, generator=None) -> Cond:
    """Replace each sample's condition by the null condition with probability p (Ho & Salimans 2022, Alg. 1).

    Every entry the null condition has (context, mask, pooled) is swapped together; entries it lacks (e.g.
    SDXL's size/crop ``time_ids``) are kept, as SDXL's pipelines give both guidance halves the same ids.
    ``generator``: one torch.Generator, or a list with one per sample.
    """
    if p <= 0:
        return cond
    B = cond["context"].shape[0]
    drop = to_device(rand(B, generator) < p, cond["context"].device)  # (B,)
    out = {}
    for key, value in cond.items():
        if key not in null:
            out[key] = value
            continue
        mask = drop.view(B, *([1] * (value.dim() - 1)))
        out[key] = torch.where(mask, null[key].to(value.device).expand_as(value), value)
    return out
