"""SDXL's size and crop micro-conditioning inputs (Podell et al. 2023, Sec. 2.2).

The UNet is told each training image's original size (before resizing), the top-left corner of its crop and
the size it was trained at, so at sampling time one can ask for an uncropped, full-resolution-looking image
(crop (0, 0), original = target size). This module only builds the ``time_ids`` vector; the UNet embeds each
number with sinusoidal features (``ldm.models.unet``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Size = Sequence[int] | Sequence[float]
NUM_TIME_IDS = 6  # (original h, original w, crop top, crop left, target h, target w)


def micro_conditions(original_size: Size | torch.Tensor, crop_top_left: Size | torch.Tensor,
                     target_size: Size | torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """SDXL's time_ids (B, 6) = [original (h, w), crop (top, left), target (h, w)], in pixels, float32.

    Each argument is one pair (broadcast over ``batch`` rows, default 1) or a (B, 2) tensor of per-image pairs.
    """
    parts = [torch.as_tensor(v, dtype=torch.float32) for v in (original_size, crop_top_left, target_size)]
    rows = {p.shape[0] for p in parts if p.ndim == 2}
    if any(p.shape[-1:] != (2,) or p.ndim > 2 for p in parts) or len(rows) > 1:
        raise ValueError(f"sizes and crops must be (h, w) pairs or (B, 2) tensors of one B, got "
                         f"{[tuple(p.shape) for p in parts]}")
    b = rows.pop() if rows else (batch or 1)
    if batch is not None and b != batch:
        raise ValueError(f"got {b} rows of sizes for a batch of {batch}")
    return torch.cat([p.reshape(-1, 2).expand(b, 2) for p in parts], dim=1)  # (B, 6)
