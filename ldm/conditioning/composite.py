"""Several frozen text encoders as one: token features concatenated along the feature axis, the pooled vector
from one of them (SDXL, Podell et al. 2023, Sec. 2.1: CLIP ViT-L and OpenCLIP ViT-bigG penultimate layers,
pooled from bigG) or several (concatenated), and optionally further encoders whose tokens follow along the sequence
axis (SD3, Esser et al. 2024, Sec. 4 and Fig. 2: the CLIP-L and CLIP-G features side by side, zero-padded to T5's width,
then T5's tokens; the pooled vector is both CLIP pooled vectors).

Positions line up only when the encoders tokenize alike (SDXL's two CLIP tokenizers share their BPE and
length), so every encoder whose features are concatenated must have the same ``max_length``; a position is attended
when any of them attends to it. Appended encoders keep their own length and mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.conditioning.base import Cond, FrozenTextEncoder


def _pooled_indices(pooled_from: int | Sequence[int] | None, count: int) -> tuple[int, ...]:
    if pooled_from is None:
        return ()
    indices = (pooled_from,) if isinstance(pooled_from, int) else tuple(pooled_from)
    if not indices:
        raise ValueError("pooled_from is an empty list: give an index, several, or None (no pooled vector)")
    bad = [i for i in indices if not -count <= i < count]
    if bad:
        raise ValueError(f"pooled_from={pooled_from} is not an index of the {count} encoders")
    return indices


class CompositeTextEncoder(FrozenTextEncoder):
    """Run every encoder on the prompts: context (B, L + sum L_j, max(sum D_i, D_j)) = [features of ``encoders``
    concatenated (padded with zeros), then each appended encoder's tokens]; mask = any over ``encoders``, then the
    appended masks; pooled = the pooled vectors of ``pooled_from`` (an index or several, concatenated in order)."""

    def __init__(self, encoders: Sequence[FrozenTextEncoder], pooled_from: int | Sequence[int] | None = -1,
                 appended: Sequence[FrozenTextEncoder] = ()):
        super().__init__()
        if not encoders:
            raise ValueError("a composite text encoder needs at least one encoder")
        lengths = [e.max_length for e in encoders]
        if len(set(lengths)) != 1:
            raise ValueError(f"the encoders' max_length differ ({lengths}): their token positions would not line up")
        indices = _pooled_indices(pooled_from, len(encoders))
        for i in indices:
            if not getattr(encoders[i], "pooled", False):
                raise ValueError(f"encoder {i} ({type(encoders[i]).__name__}) gives no pooled vector: build it with "
                                 "pooled=True")
        self.encoders = nn.ModuleList(encoders)
        self.appended = nn.ModuleList(appended)
        self.pooled_from = pooled_from if isinstance(pooled_from, int) or pooled_from is None else list(indices)
        self._pooled = indices
        self.pooled = bool(indices)
        self.max_length = lengths[0] + sum(e.max_length for e in appended)
        self.dim = max([sum(e.dim for e in encoders)] + [e.dim for e in appended])
        self.pooled_dim = sum(encoders[i].pooled_dim for i in indices)
        self.freeze()

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Cond:
        """Encode prompts with every encoder: context (B, L, D), context_mask (B, L)[, pooled (B, P)]."""
        conds = [encoder(prompts) for encoder in self.encoders]
        context = torch.cat([c["context"] for c in conds], dim=-1)  # (B, L0, sum D_i)
        mask = torch.stack([c["context_mask"] for c in conds]).any(dim=0)  # (B, L0)
        if len(self.appended):
            tails = [encoder(prompts) for encoder in self.appended]
            context = torch.cat([F.pad(c, (0, self.dim - c.shape[-1]))  # (B, L_j, D), zeros on the right
                                 for c in [context] + [t["context"] for t in tails]], dim=1)  # (B, L, D)
            mask = torch.cat([mask] + [t["context_mask"] for t in tails], dim=1)  # (B, L)
        cond = {"context": context, "context_mask": mask}
        if self._pooled:
            cond["pooled"] = torch.cat([conds[i]["pooled"] for i in self._pooled], dim=-1)  # (B, P)
        return cond


def sdxl_text_encoders(folder: str | Path, max_length: int = 77) -> list[dict[str, Any]]:
    """Encoder specs (for ``build_text_encoders``) of a diffusers SDXL pipeline folder: CLIP ViT-L
    (``text_encoder/``) and OpenCLIP ViT-bigG in transformers' layout (``text_encoder_2/``), both read at the
    penultimate layer without the final layer norm, every position attended, pooled projection from the second."""
    common = dict(kind="clip", path=str(folder), max_length=max_length, layer="penultimate", final_norm=False)
    return [dict(common, subfolder="text_encoder"),
            dict(common, subfolder="text_encoder_2", projection=True, pooled=True)]


def sd3_text_encoders(folder: str | Path, max_length: int = 77, t5_max_length: int = 256) -> dict[str, Any]:
    """``build_text_encoders`` arguments for a diffusers SD3 pipeline folder: CLIP-L (``text_encoder/``) and CLIP-G
    (``text_encoder_2/``), both with projection, read at the penultimate layer without the final norm, every position
    attended, their pooled projections concatenated; then T5 (``text_encoder_3/``) for t5_max_length tokens, run
    without a mask and every position attended, as SD3's pipelines encode prompts."""
    clip = dict(kind="clip", path=str(folder), max_length=max_length, layer="penultimate", final_norm=False,
                projection=True, pooled=True)
    t5 = dict(kind="t5", path=str(folder), max_length=t5_max_length, mask_padding=False, subfolder="text_encoder_3")
    return {"specs": [dict(clip, subfolder="text_encoder"), dict(clip, subfolder="text_encoder_2")],
            "pooled_from": [0, 1], "appended": [t5]}
