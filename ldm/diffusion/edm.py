"""EDM's preconditioning (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

In EDM's frame x_edm = x_t / alpha = x0 + sigma_edm n with sigma_edm = sigma / alpha (their Eq. 4 with s(t) = alpha),
the denoiser is D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (Eq. 7) with (Table 1, "Network and
preconditioning")

    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),    c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
    c_in = 1 / sqrt(sigma^2 + sigma_data^2),              c_noise = ln(sigma) / 4,

chosen so the network's input and its training target (x0 - c_skip x) / c_out have unit variance for data of
std sigma_data (their App. B.6), and the loss weight lambda(sigma) = 1 / c_out^2 makes the effective weight of
F's error one at every sigma (Eq. 8; ``parameterization.loss_weight(..., "edm")``). ``EDMPrecond`` wraps any network
F into a denoiser of the project's interface whose output is x0 (prediction "x0"), on any process with alpha > 0.
"""

from __future__ import annotations

from typing import Any

import torch

from ldm.diffusion.parameterization import Denoiser, time_dtype
from ldm.diffusion.sde import GaussianProcess, as_time, bcast

Tensor = torch.Tensor


def edm_coefficients(sigma: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) at EDM noise levels sigma (Karras et al. 2022, Table 1)."""
    sigma = as_time(sigma)
    norm = (sigma**2 + sigma_data**2).sqrt()
    return sigma_data**2 / norm**2, sigma * sigma_data / norm, 1 / norm, sigma.log() / 4


class EDMPrecond:
    """D(x_t, model_time, cond) = x0 estimate: c_skip x_edm + c_out F(c_in x_edm, c_noise, cond), x_edm = x_t / alpha.

    ``network(x, c_noise (B,), cond)`` is the raw network; ``c_noise_scale`` multiplies its noise input (1: the
    paper's ln(sigma) / 4; a network with a sinusoidal embedding tuned for timesteps 0..1000 may want ~250).
    """

    def __init__(self, network: Denoiser, process: GaussianProcess, sigma_data: float = 0.5,
                 c_noise_scale: float = 1.0):
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.network, self.process = network, process
        self.sigma_data, self.c_noise_scale = float(sigma_data), float(c_noise_scale)

    def __call__(self, x_t: Tensor, model_time: Tensor, cond: Any = None) -> Tensor:
        t = self.process.time_from_model(model_time.detach().double().cpu())  # (B,) float64 on the CPU
        alpha = self.process.alpha(t)
        if bool((alpha <= 0).any()):
            raise ValueError("EDM preconditioning needs alpha > 0: c_noise = ln(sigma / alpha) / 4 is infinite at "
                             "zero SNR (the flow's and a zero-terminal-SNR chain's t = 1)")
        sigma = self.process.sigma(t) / alpha  # (B,) EDM noise level
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        x = x_t / bcast(alpha, x_t)  # (B, ...) in EDM's frame
        out = self.network(bcast(c_in, x) * x, (self.c_noise_scale * c_noise).to(x_t.device, time_dtype(x_t)), cond)
        return bcast(c_skip, x) * x + bcast(c_out, x) * out.to(x.dtype)
