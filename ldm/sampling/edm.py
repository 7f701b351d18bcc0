"""EDM's samplers (Karras et al. 2022) on any process, in EDM's frame x_edm = x / alpha, sigma_edm = sigma / alpha.

In that frame every process is the same ODE dx_edm / dsigma_edm = (x_edm - D) / sigma_edm = eps (their Eq. 4 with
s(t) = alpha), so a step of length dsigma_edm is x_edm + dsigma_edm eps. Mapped back, the Euler step to s is
x_s = alpha_s x0 + sigma_s eps (= DDIM) and needs no division by alpha_t, so grids that start at alpha = 0 (the flow,
zero-terminal-SNR chains) work too. Both samplers take the project's ``Predictor`` and a time grid (the Karras grid
is ``spacing="karras"``); randomness only from the passed generator(s).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ldm.diffusion.parameterization import Predictor
from ldm.sampling.steps import Callback, intervals, noise_like

Tensor = torch.Tensor


@torch.no_grad()
def edm_heun(model: Predictor, x: Tensor, ts: Tensor, cond: Any = None, generator=None, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0, callback: Callback = None) -> Tensor:
    """EDM's 2nd-order Heun sampler with stochastic churn (Karras et al. 2022, Alg. 2; s_churn = 0 is Alg. 1).

    At sigma_i in [s_tmin, s_tmax], gamma_i = min(s_churn / N, sqrt(2) - 1) raises the noise level to
    sigma_hat = (1 + gamma_i) sigma_i by adding N(0, (sigma_hat^2 - sigma_i^2) s_noise^2) noise in EDM's frame (capped
    at the process's largest level sigma_edm(1)); then a Heun step in sigma_edm to sigma_{i+1} (an Euler step
    into 0, i.e. the x0 estimate, and from sigma = inf, where the trapezoid is not defined).
    """
    p = model.process
    steps = len(ts) - 1
    top = float(p.edm_sigma(1.0))
    for i, (t, s, last) in enumerate(intervals(ts)):
        sig_t = float(p.edm_sigma(t))
        gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= sig_t <= s_tmax else 0.0
        sig_hat = min(sig_t * (1 + gamma), top)
        if gamma > 0 and sig_hat > sig_t:  # churn: x_hat = x + sqrt(sigma_hat^2 - sigma^2) eps_i in EDM's frame
            t_hat = float(p.time_from_edm_sigma(sig_hat))
            z = noise_like(x, generator)
            x = float(p.alpha(t_hat)) * (x / float(p.alpha(t)) + s_noise * math.sqrt(sig_hat**2 - sig_t**2) * z)
            t, sig_t = t_hat, sig_hat
        x0, eps = model(x, t, cond)
        if callback is not None:
            callback(i, t, x, x0)
        if last:
            return x0
        alpha_s, sigma_s = float(p.alpha(s)), float(p.sigma(s))
        x_next = alpha_s * x0 + sigma_s * eps  # Euler: x_edm + (sigma_s - sigma_t) eps
        if math.isfinite(sig_t):  # trapezoid: + (sigma_s - sigma_t) (eps' - eps) / 2 in EDM's frame
            eps_next = model(x_next, s, cond)[1]
            x_next = x_next + 0.5 * (sigma_s - alpha_s * sig_t) * (eps_next - eps)
        x = x_next
    return x


@torch.no_grad()
def euler_ancestral(model: Predictor, x: Tensor, ts: Tensor, cond: Any = None, generator=None, eta: float = 1.0,
                    callback: Callback = None) -> Tensor:
    """Euler-ancestral (k-diffusion's sample_euler_ancestral; diffusers' EulerAncestralDiscreteScheduler).

    In EDM's frame from sigma_t to sigma_s: sigma_up = min(sigma_s, eta sqrt(sigma_s^2 (sigma_t^2 - sigma_s^2) /
    sigma_t^2)), sigma_down = sqrt(sigma_s^2 - sigma_up^2); an Euler step to sigma_down, then N(0, sigma_up^2) noise:
    x_s = alpha_s (x0 + sigma_down eps + sigma_up z). sigma_up^2 is eta^2 times the posterior variance of q(x_s | x_t,
    x0) (Ho et al. 2020, Eq. 7), so this is DDIM with the same eta (Song et al. 2021, Eq. 12): eta = 1 is DDPM.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    p = model.process
    for i, (t, s, last) in enumerate(intervals(ts)):
        x0, eps = model(x, t, cond)
        if callback is not None:
            callback(i, t, x, x0)
        if last:
            return x0
        sig_t, sig_s, alpha_s = float(p.edm_sigma(t)), float(p.edm_sigma(s)), float(p.alpha(s))
        kept = (sig_s / sig_t) ** 2  # 0 from sigma_t = inf
        sig_up = min(sig_s, eta * sig_s * math.sqrt(1 - kept))
        sig_down = math.sqrt(max(sig_s**2 - sig_up**2, 0.0))
        x = alpha_s * x0 + alpha_s * sig_down * eps
        if sig_up > 0:
            x = x + alpha_s * sig_up * noise_like(x, generator)
    return x
