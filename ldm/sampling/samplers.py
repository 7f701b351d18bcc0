"""Samplers: small pure functions over a Predictor (x_t, t, cond) -> (x0, eps).

Each takes the prior sample ``x`` at ts[0] and a descending grid ``ts`` whose last entry is 0, and returns
the clean sample. The final transition to t = 0 always returns the model's x0 estimate (the "denoising
step" of Song et al. 2021; for DDPM/DDIM it is exactly the posterior mean at alpha = 1, sigma = 0).
Randomness comes only from ``generator`` (one ``torch.Generator`` or one per batch element). Every sampler
takes ``callback(i, t, x, x0_hat)`` (``steps.Callback``), called once per interval and never changing the
arithmetic. EDM's samplers are in ``edm.py``, the high-order multistep solvers in ``multistep.py``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ldm.diffusion.parameterization import Predictor, score_from_eps
from ldm.sampling.edm import edm_heun, euler_ancestral
from ldm.sampling.multistep import dpm_solver_pp_2m_sde, dpm_solver_pp_3m, unipc
from ldm.sampling.steps import Callback
from ldm.sampling.steps import intervals as _pairs
from ldm.sampling.steps import noise_like as _noise

Tensor = torch.Tensor


def check_finite_sde(p, t: float, name: str) -> None:
    """ValueError when the process's forward SDE is singular at the grid's first time (a reverse-SDE start there)."""
    if not math.isfinite(float(p.g2(t))):
        raise ValueError(f"{name}: the forward SDE of {type(p).__name__} is singular at t = {t} (g^2 = inf, e.g. the "
                         "flow at t = 1); use flow_sde, ddpm, euler_ancestral or an ODE sampler")


@torch.no_grad()
def ddpm(model: Predictor, x: Tensor, ts: Tensor, cond: Any = None, generator=None, variance: str = "small",
         callback: Callback = None) -> Tensor:
    """Ancestral sampling from q(x_s | x_t, x0_hat) (Ho et al. 2020, Alg. 2), on any sub-grid of times.

    variance="small" uses the posterior variance beta_tilde, "large" the forward variance beta (Ho et al. Sec. 3.2).
    """
    if variance not in ("small", "large"):
        raise ValueError(f"variance must be 'small' or 'large', got {variance!r}")
    p = model.process
    for i, (t, s, last) in enumerate(_pairs(ts)):
        x0, _ = model(x, t, cond)
        if callback is not None:
            callback(i, t, x, x0)
        if last:
            return x0
        mean, var_small = p.posterior(x, x0, t, s)
        var = var_small if variance == "small" else p.transition(t, s)[1]
        x = mean + float(var.sqrt()) * _noise(x, generator)
    return x


@torch.no_grad()
def ddim(model: Predictor, x: Tensor, ts: Tensor, cond: Any = None, generator=None, eta: float = 0.0,
         callback: Callback = None) -> Tensor:
    """DDIM (Song, Meng & Ermon 2021, Eq. 12): eta = 0 deterministic; eta = 1 is exactly ddpm(variance="small").

    On the rectified flow, eta = 0 is the Euler step of dx/dt = eps - x0 (alpha, sigma linear in t)."""
    p = model.process
    for i, (t, s, last) in enumerate(_pairs(ts)):
        x0, eps = model(x, t, cond)
        if callback is not None:
            callback(i, t, x, x0)
        if last:
            return x0
        c2 = eta**2 * float(p.posterior_variance(t, s)) if eta > 0 else 0.0  # sigma_t(eta)^2 = eta^2 beta_tilde
        x = float(p.alpha(s)) * x0 + math.sqrt(max(float(p.sigma(s)) ** 2 - c2, 0.0)) * eps
        if eta > 0:
            x = x + math.sqrt(c2) * _noise(x, generator)
    return x


@torch.no_grad()
def euler_maruyama(model: Predictor, x: Tensor, ts: Tensor, cond: Any = None, generator=None,
                   callback: Callback = None) -> Tensor:
    """Reverse-time SDE dx = [f x - g^2 score] dt + g dw_bar by Euler-Maruyama (Song et al. 2021, Eq. 6)."""
    p = model.process
    check_finite_sde(p, float(ts[0]), "euler_maruyama")
    for i, (t, s, last) in enumerate(_pairs(ts)):
        x0, eps = model(x, t, cond)
        if callback is not None:
            callback(i, t, x, x0)
        if last:
            return x0
        dt = s - t  # < 0
        score = -eps / float(p.sigma(t))
        x = x + p.reverse_drift(x, t, score) * dt + float(p.diffusion(t)) * math.sqrt(-dt) * _noise(x, generator)
    return x


@torch.no_grad()
def predictor_corrector(model: Predictor, x: Tensor, ts: Tensor, cond: Any = None, generator=None,
                        predictor: str = "reverse_diffusion", corrector_steps: int = 1, snr: float = 0.16,
                        callback: Callback = None) -> Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Alg. 1-3 as in their code): Langevin corrector, then a predictor.

    Corrector (Alg. 3): x <- x + e score + sqrt(2 e) z, e = 2 a^2 (snr ||z|| / ||score||)^2, a = alpha_t / alpha_s,
    norms averaged over the batch as in the reference code (per-sample norms blow up in low dimension).
    Predictor "reverse_diffusion" is the ancestral step that inverts x_t = a x_s + sigma_{t|s} z (Song et al. Eq. 47,
    Ho et al. Alg. 2): x_s = (x_t + sigma_{t|s}^2 score) / a + sigma_{t|s} z, evaluated in the equivalent form
    posterior_mean(x_t, x0_hat) + sigma_{t|s} z that stays finite at zero SNR (a = 0); "euler" is Euler-Maruyama.
    """
    if predictor not in ("reverse_diffusion", "euler"):
        raise ValueError(f"predictor must be 'reverse_diffusion' or 'euler', got {predictor!r}")
    p = model.process
    if predictor == "euler":
        check_finite_sde(p, float(ts[0]), "pc with predictor 'euler'")
    for i, (t, s, last) in enumerate(_pairs(ts)):
        a, var = p.transition(t, s)
        a, var = float(a), float(var)
        for _ in range(corrector_steps):
            score = model.score(x, t, cond)
            z = _noise(x, generator)
            ratio = float(z.flatten(1).norm(dim=1).mean() / score.flatten(1).norm(dim=1).mean().clamp_min(1e-12))
            step = 2 * a**2 * (snr * ratio) ** 2
            x = x + step * score + math.sqrt(2 * step) * z
        x0, eps = model(x, t, cond)
        if callback is not None:
            callback(i, t, x, x0)
        if last:
            return x0
        if predictor == "euler":
            dt = s - t
            score = -eps / float(p.sigma(t))
            x = x + p.reverse_drift(x, t, score) * dt + float(p.diffusion(t)) * math.sqrt(-dt) * _noise(x, generator)
        else:
            x = p.posterior(x, x0, t, s)[0] + math.sqrt(var) * _noise(x, generator)
    return x


@torch.no_grad()
def euler_ode(model: Predictor, x: Tensor, ts: Tensor, cond: Any = None, generator=None,
              callback: Callback = None) -> Tensor:
    """Euler's method in t on the probability-flow ODE dx/dt = alpha' x0 + sigma' eps (Song et al. 2021, Eq. 13).

    On the rectified flow this is dx/dt = eps - x0 = the velocity (Liu et al. 2023, Eq. 1; Esser et al. 2024, SD3's
    sampler; diffusers' FlowMatchEulerDiscreteScheduler), where it coincides with DDIM."""
    p = model.process
    for i, (t, s, last) in enumerate(_pairs(ts)):
        x0, eps = model(x, t, cond)
        if callback is not None:
            callback(i, t, x, x0)
        if last:
            return x0
        x = x + (s - t) * p.ode_velocity(x0, eps, t)
    return x


@torch.no_grad()
def heun_ode(model: Predictor, x: Tensor, ts: Tensor, cond: Any = None, generator=None,
             callback: Callback = None) -> Tensor:
    """Probability-flow ODE dx/dt = f x - g^2 score / 2 (Song et al. Eq. 13) with Heun's 2nd-order method.

    The drift is evaluated as alpha' x0 + sigma' eps (``GaussianProcess.ode_velocity``), the same ODE written so it
    stays finite at alpha = 0; on the rectified flow it is diffusers' FlowMatchHeunDiscreteScheduler."""
    p = model.process
    for i, (t, s, last) in enumerate(_pairs(ts)):
        x0, eps = model(x, t, cond)
        if callback is not None:
            callback(i, t, x, x0)
        if last:
            return x0
        d1 = p.ode_velocity(x0, eps, t)
        x_euler = x + (s - t) * d1
        x = x + (s - t) * 0.5 * (d1 + p.ode_velocity(*model(x_euler, s, cond), s))
    return x


@torch.no_grad()
def flow_sde(model: Predictor, x: Tensor, ts: Tensor, cond: Any = None, generator=None, noise: float = 1.0,
             callback: Callback = None) -> Tensor:
    """Euler-Maruyama on the reverse SDE dx = [u - w/2 score] dt + sqrt(w) dw_bar, w(t) = noise * sigma(t).

    u = alpha' x0 + sigma' eps is the probability-flow velocity (eps - x0 on the flow) and score = -eps / sigma.
    For any w >= 0 the SDE has the marginals p_t (the w/2 score terms cancel in the Fokker-Planck equation; Song et
    al. 2021, Eq. 13 and App. D.1); w = sigma(t) is SiT's default diffusion coefficient (Ma et al. 2024, Sec. 2, SDE
    sampling with a tunable w_t; their code's "sigma" form), finite at the flow's t = 1 where the flow's VP-type
    reverse SDE is singular.
    noise = 0 is euler_ode. The last step returns the x0 estimate (SiT's "Mean" last step)."""
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    p = model.process
    for i, (t, s, last) in enumerate(_pairs(ts)):
        x0, eps = model(x, t, cond)
        if callback is not None:
            callback(i, t, x, x0)
        if last:
            return x0
        sigma_t = float(p.sigma(t))
        w = noise * sigma_t
        drift = p.ode_velocity(x0, eps, t) + (0.5 * w / sigma_t) * eps  # u - w/2 score, score = -eps / sigma
        x = x + (s - t) * drift
        if w > 0:
            x = x + math.sqrt(w * (t - s)) * _noise(x, generator)
    return x


@torch.no_grad()
def dpm_solver_pp_2m(model: Predictor, x: Tensor, ts: Tensor, cond: Any = None, generator=None,
                     callback: Callback = None) -> Tensor:
    """DPM-Solver++(2M), the multistep 2nd-order data-prediction solver (Lu et al. 2022, Alg. 2)."""
    p = model.process
    x0_prev, h_prev = None, None
    for i, (t, s, last) in enumerate(_pairs(ts)):
        x0, _ = model(x, t, cond)
        if callback is not None:
            callback(i, t, x, x0)
        if last:
            return x0
        lam_t, lam_s = float(p.log_snr_half(t)), float(p.log_snr_half(s))
        h = lam_s - lam_t
        if x0_prev is None:
            d = x0
        else:  # D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1},  r = h_prev / h
            c = h / (2 * h_prev)
            d = (1 + c) * x0 - c * x0_prev
        x = float(p.sigma(s) / p.sigma(t)) * x - float(p.alpha(s)) * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


@torch.no_grad()
def annealed_langevin(model: Predictor, x: Tensor, ts: Tensor, cond: Any = None, generator=None,
                      steps_per_level: int = 5, step_size: float = 0.2, callback: Callback = None) -> Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1): the grid's times are the noise levels, largest first.

    At level t, steps_per_level updates x <- x + (a / 2) score(x, t) + sqrt(a) z with a = step_size sigma_t^2: their
    alpha_i = epsilon sigma_i^2 / sigma_L^2 with step_size = epsilon / sigma_L^2 (0.2 for their epsilon = 2e-5 at
    sigma_L = 0.01), so the step stays in proportion to each level whatever the grid's last level is.
    The last level ends with the denoised estimate E[x0 | x] (Tweedie), as every sampler here does. The callback
    gets each level's last Langevin input and the x0 estimate of that same evaluation.
    """
    if steps_per_level < 1 or step_size <= 0:
        raise ValueError(f"need steps_per_level >= 1 and step_size > 0, got {steps_per_level}, {step_size}")
    for i, (t, _, last) in enumerate(_pairs(ts)):
        sigma = model.process.sigma(t)
        a = step_size * float(sigma) ** 2
        for k in range(steps_per_level):
            x0, eps = model(x, t, cond)
            if callback is not None and k == steps_per_level - 1:
                callback(i, t, x, x0)
            x = x + 0.5 * a * score_from_eps(eps, sigma) + math.sqrt(a) * _noise(x, generator)
        if last:
            return model(x, t, cond)[0]
    return x


SAMPLERS = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler_maruyama": euler_maruyama,
    "pc": predictor_corrector,
    "euler_ode": euler_ode,
    "heun_ode": heun_ode,
    "flow_sde": flow_sde,
    "dpmpp_2m": dpm_solver_pp_2m,
    "dpmpp_3m": dpm_solver_pp_3m,
    "dpmpp_2m_sde": dpm_solver_pp_2m_sde,
    "unipc": unipc,
    "edm_heun": edm_heun,
    "euler_ancestral": euler_ancestral,
    "annealed_langevin": annealed_langevin,
}

# default time grids: on a discrete chain the schedule's own timesteps ("trailing", Lin et al. 2023) for the
# chain samplers and the multistep solvers; continuous solvers uniform in t, the multistep solvers uniform in log-SNR
# (Lu et al. 2022) on continuous processes; EDM's Heun on the Karras grid (Karras et al. 2022, Eq. 5) everywhere
_MULTISTEP = ("dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc")
DEFAULT_SPACING = {"ddpm": "trailing", "ddim": "trailing", "annealed_langevin": "trailing",
                   "euler_ancestral": "trailing", **{name: "trailing" for name in _MULTISTEP}, "edm_heun": "karras",
                   "euler_maruyama": "uniform", "pc": "uniform", "euler_ode": "uniform", "heun_ode": "uniform",
                   "flow_sde": "uniform"}
DEFAULT_CONTINUOUS_SPACING = {**{name: "logsnr" for name in _MULTISTEP}, "edm_heun": "karras"}
