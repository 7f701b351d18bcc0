"""Choosing how a model is sampled without looking at the scored prompts.

The protocol's scored prompts are the captions of the floor set F. Sampling settings (sampler, steps, guidance) chosen
by their scores on F would be fitted to the test set, so they are chosen on a *tuning set* T instead: real images
from the rest of the split (never in F or the reference set R) whose captions are not among F's, so no prompt of T is
a prompt of F (the emoji data has two images per caption, one per style), with seeds of their own. T is scored like F
(FID and KID against R, alignment by the same classifier); the chosen settings are then scored once on F.

The rule (``choose``): among the settings whose alignment is not significantly below the best one's (its 95 % upper
bound reaches the best point estimate), the lowest FID. Text alignment is what a text-to-image model is for, and
guidance trades it against FID; this keeps the best alignment the interval can resolve and then the best images.
"""

from __future__ import annotations

from typing import Mapping, Sequence

TUNING_SEED_OFFSET = 1_000_000  # tuning image i is drawn from seed + offset + i: no starting noise shared with F


def tuning_indices(captions: Sequence[str], floor: Sequence[int], rest: Sequence[int], n: int) -> list[int]:
    """Indices of the tuning set: the first ``n`` of ``rest`` (already in seeded order) whose caption is not a
    caption of the floor set; fewer when the rest has fewer such images."""
    scored = {captions[i] for i in floor}
    return [i for i in rest if captions[i] not in scored][:n]


def choose(rows: Sequence[Mapping[str, float]]) -> Mapping[str, float]:
    """The setting to sample with: the lowest FID among the rows whose alignment interval reaches the best alignment
    (rows without alignment: the lowest FID)."""
    if not rows:
        raise ValueError("no evaluated settings to choose from")
    if all("class_acc" in r for r in rows):
        best = max(r["class_acc"] for r in rows)
        rows = [r for r in rows if r.get("class_acc_hi", r["class_acc"]) >= best]
    return min(rows, key=lambda r: r["fid"])
