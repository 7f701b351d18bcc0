"""Validation split by a stable hash of each sample's name, for data sets that come without one.

A sample belongs to the held-out part when sha256("<seed>:<name>") read as a fraction of 2**64 falls below
``val_fraction``: it does not depend on the order of the samples, on the other samples, on the number of
ranks or workers, or on the machine. ``ldm-shards reshard --val-fraction F --seed S`` and a stream with
``KeyHoldout(F, ..., seed=S)`` over the same input hold out exactly the same keys.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

SPLITS = ("train", "val")


def held_out(name: str, val_fraction: float, seed: int) -> bool:
    """True when the sample named `name` belongs to the validation split (a stable hash, not an RNG)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


@dataclass(frozen=True)
class KeyHoldout:
    """Keep one part of a stream: ``split="val"`` the samples whose key is held out, ``"train"`` the others."""

    fraction: float
    split: str
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"held-out fraction must be in (0, 1), got {self.fraction}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")

    def keeps(self, key: str) -> bool:
        """True when the sample with this ``__key__`` belongs to this part."""
        return held_out(key, self.fraction, self.seed) == (self.split == "val")
