"""Sinusoidal features, the MLPs that embed timesteps and SDXL's size/crop micro-conditions, and the patch embedding
with 2-D sin-cos positions of the transformer backbones.

``timestep_embedding`` is the transformer position encoding used for diffusion timesteps (Ho et al. 2020,
Appendix B), laid out as diffusers' ``Timesteps(flip_sin_to_cos=True, freq_shift=0)``: [cos, sin]. SDXL
(Podell et al. 2023, Sec. 2.2) embeds each size/crop number with the same features (``add_time_proj``).

``PatchEmbed`` cuts latents into p x p patches (Dosovitskiy et al. 2021; Peebles & Xie 2023, Sec. 3.2) and adds
fixed 2-D sin-cos positions computed for the latent's own height and width, in one of the two conventions of
diffusers' ``PatchEmbed``: PixArt's (every grid is stretched over the trained ``base_size`` patches per side,
Chen et al. 2023) or SD3's (the centre crop of a ``max_size`` x ``max_size`` grid, Esser et al. 2024).
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


def batch_timesteps(t: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """Timesteps as a (batch,) tensor: a scalar is broadcast, a (batch,) tensor passes; anything else is an error."""
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t.reshape(1).expand(batch)  # (B,)
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
    return t


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



class ProjectionMLP(nn.Module):
    """Linear, activation, linear (diffusers' ``PixArtAlphaTextProjection``): PixArt's caption projection (tanh GELU),
    SD3's pooled-text embedder (SiLU)."""

    def __init__(self, in_dim: int, dim: int, activation: str = "gelu_tanh"):
        super().__init__()
        if activation not in ("gelu_tanh", "silu"):
            raise ValueError(f"activation must be 'gelu_tanh' or 'silu', got {activation!r}")
        self.activation = activation
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (..., in_dim) to (..., dim)."""
        h = self.linear_1(x)
        return self.linear_2(F.gelu(h, approximate="tanh") if self.activation == "gelu_tanh" else F.silu(h))


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[sin(pos w), cos(pos w)] for w_k = 10000^(-2k/dim) (Vaswani et al. 2017): (M,) -> (M, dim), float64."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    args = torch.outer(positions.double(), 1.0 / 10000**omega)  # (M, dim/2)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (M, dim)


class PatchEmbed(nn.Module):
    """p x p patches -> tokens (a stride-p convolution, named ``proj`` as in diffusers) plus 2-D sin-cos positions.

    Positions are computed for each latent size (cached per size and device), so non-square and bucketed batches
    work. A token at patch row i, column j gets [sincos(x_j), sincos(y_i)] with half the width each, where the
    coordinates are, per axis of n patches:
      PixArt (``max_size`` None): i / (n / base_size) / interpolation_scale (every size spans the base grid);
      SD3 (``max_size`` m):        (i + (m - n) // 2) / (m / base_size) / interpolation_scale (a centred crop; n <= m).
    The table is computed in float32 coordinates and float64 sines and rounded to float32, as diffusers does.
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int, base_size: int,
                 interpolation_scale: float = 1.0, max_size: int | None = None):
        super().__init__()
        if dim % 4:
            raise ValueError(f"the token width {dim} must be a multiple of 4 for 2-D sin-cos positions")
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.dim, self.patch_size, self.base_size = dim, patch_size, base_size
        self.interpolation_scale, self.max_size = interpolation_scale, max_size
        self._positions: dict[tuple[int, int, str], torch.Tensor] = {}

    def coordinates(self, n: int) -> torch.Tensor:
        """Position of each of n patches along one axis, float32 (n,)."""
        if self.max_size is None:
            return torch.arange(n, dtype=torch.float32) / (n / self.base_size) / self.interpolation_scale
        grid = torch.arange(self.max_size, dtype=torch.float32) / (self.max_size / self.base_size)
        top = (self.max_size - n) // 2
        return grid[top:top + n] / self.interpolation_scale

    def table(self, rows: int, cols: int) -> torch.Tensor:
        """The (rows * cols, dim) float32 position table, row-major like the tokens."""
        y, x = self.coordinates(rows), self.coordinates(cols)  # (rows,), (cols,)
        half = self.dim // 2
        emb_x = sincos_1d(half, x)[None, :, :].expand(rows, cols, half)  # (rows, cols, dim/2)
        emb_y = sincos_1d(half, y)[:, None, :].expand(rows, cols, half)  # (rows, cols, dim/2)
        return torch.cat([emb_x, emb_y], dim=-1).reshape(rows * cols, self.dim).float()  # (rows*cols, dim)

    def positions(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        """The cached position table for a rows x cols grid of patches on device."""
        key = (rows, cols, str(device))
        if key not in self._positions:
            if self.max_size is not None and max(rows, cols) > self.max_size:
                raise ValueError(f"a latent of {rows} x {cols} patches exceeds pos_embed_max_size={self.max_size}")
            self._positions[key] = self.table(rows, cols).to(device)
        return self._positions[key]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Accept the position table diffusers stores for SD3 (``pos_embed``) when it is the one computed here."""
        stored = state_dict.pop(prefix + "pos_embed", None)
        if stored is not None:
            m = self.max_size
            if m is None or tuple(stored.shape) != (1, m * m, self.dim):
                unexpected_keys.append(prefix + "pos_embed")
            elif not torch.allclose(stored.float(), self.table(m, m)[None], atol=2e-3, rtol=0):
                error_msgs.append(f"{prefix}pos_embed: the stored position table is not the 2-D sin-cos table of a "
                                  f"{m} x {m} grid with base size {self.base_size}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map latents (B, C, H, W) to tokens (B, H/p * W/p, dim), positions added."""
        tokens = self.proj(x)  # (B, dim, H/p, W/p)
        rows, cols = tokens.shape[-2:]
        # contiguous: a transposed view would pass its layout on to the whole residual stream (every residual add
        # keeps it), and each layer reading the stream would copy it
        tokens = tokens.flatten(2).transpose(1, 2).contiguous()  # (B, N, dim)
        return tokens + self.positions(rows, cols, x.device).to(tokens.dtype)  # (B, N, dim)
