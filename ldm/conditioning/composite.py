"""Several frozen text encoders as one: token features concatenated along the feature axis, the pooled vector
from one of them (SDXL, Podell et al. 2023, Sec. 2.1: CLIP ViT-L and OpenCLIP ViT-bigG penultimate layers,
pooled from bigG).

Positions line up only when the encoders tokenize alike (SDXL's two CLIP tokenizers share their BPE and
length), so every encoder must have the same ``max_length``; a position is attended when any encoder
attends to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.conditioning.base import Cond, FrozenTextEncoder


class CompositeTextEncoder(FrozenTextEncoder):
    """Run every encoder on the prompts; context (B, L, sum D_i), mask = any, pooled from ``pooled_from``."""

    def __init__(self, encoders: Sequence[FrozenTextEncoder], pooled_from: int | None = -1):
        super().__init__()
        if not encoders:
            raise ValueError("a composite text encoder needs at least one encoder")
        lengths = [e.max_length for e in encoders]
        if len(set(lengths)) != 1:
            raise ValueError(f"the encoders' max_length differ ({lengths}): their token positions would not line up")
        if pooled_from is not None:
            if not -len(encoders) <= pooled_from < len(encoders):
                raise ValueError(f"pooled_from={pooled_from} is not an index of the {len(encoders)} encoders")
            if not getattr(encoders[pooled_from], "pooled", False):
                raise ValueError(f"encoder {pooled_from} ({type(encoders[pooled_from]).__name__}) gives no pooled "
                                 "vector: build it with pooled=True")
        self.encoders = nn.ModuleList(encoders)
        self.pooled_from = pooled_from
        self.pooled = pooled_from is not None
        self.max_length = lengths[0]
        self.dim = sum(e.dim for e in encoders)
        self.pooled_dim = encoders[pooled_from].pooled_dim if pooled_from is not None else 0
        self.freeze()

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Cond:
        """Encode prompts with every encoder: context (B, L, sum D_i), context_mask (B, L)[, pooled (B, P)]."""
        conds = [encoder(prompts) for encoder in self.encoders]
        cond = {"context": torch.cat([c["context"] for c in conds], dim=-1),  # (B, L, sum D_i)
                "context_mask": torch.stack([c["context_mask"] for c in conds]).any(dim=0)}  # (B, L)
        if self.pooled_from is not None:
            cond["pooled"] = conds[self.pooled_from]["pooled"]  # (B, P)
        return cond


def sdxl_text_encoders(folder: str | Path, max_length: int = 77) -> list[dict[str, Any]]:
    """Encoder specs (for ``build_text_encoders``) of a diffusers SDXL pipeline folder: CLIP ViT-L
    (``text_encoder/``) and OpenCLIP ViT-bigG in transformers' layout (``text_encoder_2/``), both read at the
    penultimate layer without the final layer norm, every position attended, pooled projection from the second."""
    common = dict(kind="clip", path=str(folder), max_length=max_length, layer="penultimate", final_norm=False)
    return [dict(common, subfolder="text_encoder"),
            dict(common, subfolder="text_encoder_2", projection=True, pooled=True)]
