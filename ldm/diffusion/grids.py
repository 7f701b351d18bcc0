"""Noise-level grids: the Karras rho-grid (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Eq. 5), a spacing of every process through ``GaussianProcess.timesteps(steps, "karras")``."""

from __future__ import annotations

import torch

Tensor = torch.Tensor
KARRAS_RHO = 7.0  # Karras et al. 2022, Eq. 5 and Sec. 3: rho = 7
KARRAS_SIGMA_CAP = 2.0**12  # sigma_edm at alpha^2 = 2^-24: the highest top of a Karras grid


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> Tensor:
    """n noise levels sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i < n,
    from sigma_max down to sigma_min (Karras et al. 2022, Eq. 5; their sigma_N = 0 is the grid's final time 0)."""
    if n < 1 or not 0 < sigma_min <= sigma_max or rho <= 0:
        raise ValueError(f"need n >= 1, 0 < sigma_min <= sigma_max, rho > 0; got {n}, {sigma_min}, {sigma_max}, {rho}")
    i = torch.arange(n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + i / max(n - 1, 1) * (lo - hi)) ** rho
