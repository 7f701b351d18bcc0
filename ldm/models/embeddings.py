"""Sinusoidal features and the MLPs that embed timesteps and SDXL's size/crop micro-conditions.

``timestep_embedding`` is the transformer position encoding used for diffusion timesteps (Ho et al. 2020,
Appendix B), laid out as diffusers' ``Timesteps(flip_sin_to_cos=True, freq_shift=0)``: [cos, sin]. SDXL
(Podell et al. 2023, Sec. 2.2) embeds each size/crop number with the same features (``add_time_proj``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of (possibly fractional) timesteps t (B,) -> (B, dim)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t.float()[:, None] * torch.exp(exponent)[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # (B, dim)
    return emb



class SinusoidalTimesteps(nn.Module):
    """Parameter-free timestep features (flip_sin_to_cos=True, freq_shift=0, as in SD)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Embed t (B,) as (B, dim)."""
        return timestep_embedding(t, self.dim)


class TimestepEmbedding(nn.Module):
    """Two-layer SiLU MLP on the sinusoidal features."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, in_dim) to (B, dim)."""
        return self.linear_2(F.silu(self.linear_1(x)))

