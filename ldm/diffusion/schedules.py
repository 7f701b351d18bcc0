"""Discrete noise schedules beta_1..beta_T (Ho et al. 2020; Nichol & Dhariwal 2021; Lin et al. 2023).

Every schedule returns float64 betas of length T; alpha_bar_t = prod_{s<=t} (1 - beta_s). The values are the
ones diffusers' ``DDPMScheduler`` builds for the same names ("linear", "scaled_linear", "squaredcos_cap_v2"),
computed in float64 instead of float32.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "scaled_linear", "cosine")


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> torch.Tensor:
    """DDPM linear schedule (Ho et al. 2020, Sec. 4): beta evenly spaced from beta_start to beta_end."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def scaled_linear_betas(T: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's schedule: linear in sqrt(beta)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), beta <= 0.999 (Nichol & Dhariwal, Eq. 17)."""
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so alpha_bar_T = 0 exactly (Lin et al. 2023, Alg. 1); beta_T becomes 1."""
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def make_betas(
    name: str,
    T: int,
    beta_start: float | None = None,
    beta_end: float | None = None,
    zero_terminal_snr: bool = False,
) -> torch.Tensor:
    """Build a named schedule; beta_start/beta_end default to the schedule's published values (None = default)."""
    if T < 1:
        raise ValueError(f"a schedule needs T >= 1 steps, got {T}")
    if name == "linear":
        betas = linear_betas(T, 1e-4 if beta_start is None else beta_start, 2e-2 if beta_end is None else beta_end)
    elif name == "scaled_linear":
        betas = scaled_linear_betas(T, 0.00085 if beta_start is None else beta_start,
                                    0.012 if beta_end is None else beta_end)
    elif name == "cosine":
        betas = cosine_betas(T)
    else:
        raise ValueError(f"unknown schedule {name!r}; choose from {SCHEDULES}")
    return rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas
