"""Flow matching / rectified flow as a Gaussian process, and SD3's time shift.

The straight path between data and noise, x_t = (1 - t) x0 + t eps (rectified flow, Liu et al. 2023, Eq. 1;
the conditional optimal-transport path of Lipman et al. 2023, Eq. 20-23, with sigma_min = 0; Esser et al. 2024,
Eq. 2-3 and Sec. 3.1 "RF"), is alpha(t) = 1 - t, sigma(t) = t in the interface of ``ldm.diffusion.sde``. Its
velocity dx_t/dt = eps - x0 is the prediction kind "velocity" (converted in ``parameterization``), and every sampler
runs on it. alpha(1) = 0: x0 is undefined from an eps or score prediction at t = 1 (as on a zero-terminal-SNR chain),
and the prior is exactly N(0, I).

Time shift (Esser et al. 2024, Sec. 5.3.2, Eq. 23): t' = s t / (1 + (s - 1) t), s = sqrt(m / n) when moving a
schedule from n to m pixels (SD3 uses s = 3 at 1024^2). On the flow, sigma'/alpha' = s sigma/alpha: the log-SNR
shifted by -2 log s. ``shift_time`` applies the same warp to the unit time of any process (both ends fixed).
"""

from __future__ import annotations

import math

import torch

from ldm.diffusion.grids import KARRAS_SIGMA_CAP
from ldm.diffusion.sde import GaussianProcess, as_time

Tensor = torch.Tensor


class FlowMatching(GaussianProcess):
    """x_t = (1 - t) x0 + t eps on t in [0, 1]; the network sees t * time_scale (SD3 / diffusers: 1000 sigma).

    Every sampler defaults to the uniform grid in t (SD3's, with its shift): log-SNR and Karras grids start at
    lambda = -inf here and spend most steps where t ~ 1 (measured in bench/bench_samplers.py)."""

    spacing = "uniform"

    def __init__(self, time_scale: float = 1000.0, t_min: float | None = None):
        self.time_scale = float(time_scale)
        self.t_min = 1.0 / self.time_scale if t_min is None else float(t_min)  # diffusers' sigma_min = 1 / T

    def alpha(self, t):
        return 1.0 - as_time(t)

    def sigma(self, t):
        return as_time(t).clone()

    def log_alpha(self, t):
        return torch.log1p(-t)

    def sigma2(self, t):
        return t**2

    def dlog_alpha_dt(self, t):
        return -1.0 / (1.0 - t)

    def dsigma2_dt(self, t):
        return 2 * t

    def d_alpha(self, t):
        return -torch.ones_like(as_time(t))

    def d_sigma(self, t):
        return torch.ones_like(as_time(t))

    def log_snr_half(self, t):
        t = as_time(t)
        return torch.log1p(-t) - t.log()

    def time_from_log_snr_half(self, lam):
        """(1 - t) / t = e^lambda: t = sigmoid(-lambda), exact."""
        return torch.sigmoid(-as_time(lam))

    def timesteps(self, steps: int, spacing: str = "uniform") -> Tensor:
        """The base grids; "logsnr" by the exact inverse, from lambda = -ln 2^12 (the Karras grid's top) at t = 1."""
        if spacing != "logsnr" or steps < 2:
            return super().timesteps(steps, spacing)
        bottom = float(self.log_snr_half(self.t_min))
        lam = torch.linspace(-math.log(KARRAS_SIGMA_CAP), bottom, steps, dtype=torch.float64)
        ts = self.time_from_log_snr_half(lam)
        ts[0], ts[-1] = 1.0, self.t_min
        return torch.cat([ts, torch.zeros(1, dtype=torch.float64)])

    def model_time(self, t):
        return as_time(t) * self.time_scale

    def time_from_model(self, m):
        return as_time(m) / self.time_scale


def shift_time(t: float | Tensor, shift: float) -> Tensor:
    """SD3's time shift t' = s t / (1 + (s - 1) t) (Esser et al. 2024, Eq. 23); s = 1 returns t unchanged."""
    if shift <= 0:
        raise ValueError(f"the time shift must be positive, got {shift}")
    t = as_time(t)
    if shift == 1.0:
        return t.clone()
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(pixels: int, base_pixels: int) -> float:
    """The shift s = sqrt(m / n) that keeps the SNR of a schedule tuned at n pixels when sampling m pixels (Eq. 23)."""
    if pixels <= 0 or base_pixels <= 0:
        raise ValueError(f"pixel counts must be positive, got {pixels}, {base_pixels}")
    return math.sqrt(pixels / base_pixels)
