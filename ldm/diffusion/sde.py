"""Gaussian diffusion processes x_t = alpha(t) x0 + sigma(t) eps as linear SDEs dx = f(t) x dt + g(t) dw.

One continuous time t in [0, 1] serves every process (Song et al. 2021, "Score-Based Generative Modeling
through SDEs", Sec. 3 and App. B):

* ``DiscreteVP``: the DDPM chain (Ho et al. 2020) of a discrete beta schedule. Timestep n in {0..T-1}
  sits at t_n = (n + 1) / T and log alpha_bar is interpolated linearly in between, so a model trained on
  the discrete chain is usable by continuous-time solvers (the DPM-Solver convention, Lu et al. 2022).
* ``VPSDE`` (linear beta(t)), ``SubVPSDE`` and ``VESDE`` (geometric sigma(t)); the rectified flow is
  ``ldm.diffusion.flow.FlowMatching``.

Drift and diffusion follow from the marginals of any linear SDE:
f(t) = d log alpha / dt and g(t)^2 = d sigma^2 / dt - 2 f(t) sigma^2.
The reverse-time SDE is dx = [f x - g^2 score] dt + g dw_bar (Anderson 1982; Song et al. Eq. 6) and the
probability-flow ODE is dx/dt = f x - g^2 score / 2 (Song et al. Eq. 13), which at the denoiser's estimates
reads dx/dt = alpha'(t) x0 + sigma'(t) eps (``ode_velocity``; for the rectified flow, eps - x0).
Every process also has EDM's noise level sigma_edm = sigma / alpha = exp(-lambda) (Karras et al. 2022, Sec. 2:
x / alpha is the data plus noise of std sigma_edm), the variable of the Karras grid and of EDM's samplers.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ldm.diffusion.rng import per_sample, rand, randn, to_device  # noqa: F401 - re-exported: the math's randomness
from ldm.diffusion.grids import KARRAS_SIGMA_CAP, karras_sigmas

Tensor = torch.Tensor
LOG_ALPHA_BAR_FLOOR = math.log(2.0**-24)  # between knots a zero-terminal-SNR chain keeps a finite log alpha_bar


def as_time(t: float | Tensor) -> Tensor:
    """Times as a float64 tensor (scalars stay 0-d)."""
    return torch.as_tensor(t, dtype=torch.float64)


class GaussianProcess:
    """Base: a forward process defined by its marginals alpha(t), sigma(t) on t in [0, 1]."""

    t_min: float = 1e-3  # smallest time a model is trained on / a solver integrates to
    spacing: str | None = None  # the grid every sampler uses by default on this process; None: each sampler's own

    # --- what a process defines --------------------------------------------------------------
    def log_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma2(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def dlog_alpha_dt(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def dsigma2_dt(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def model_time(self, t: Tensor) -> Tensor:
        """The timestep input the network was trained with at time t."""
        raise NotImplementedError

    def time_from_model(self, m: Tensor) -> Tensor:
        """Inverse of model_time."""
        raise NotImplementedError

    def timesteps(self, steps: int, spacing: str = "uniform") -> Tensor:
        """Descending solver grid of steps + 1 times from 1 to exactly 0 (0 means: return the clean estimate).

        "uniform" spaces t evenly on [t_min, 1]; "logsnr" spaces lambda = log(alpha/sigma) evenly (Lu et al. 2022);
        "karras" spaces sigma_edm^(1/7) evenly from sigma_edm(1) to sigma_edm(t_min) (Karras et al. 2022, Eq. 5), the
        top capped at 2^12 (alpha^2 = 2^-24, diffusers' floor: zero terminal SNR, the flow, the cosine chain's last
        knot) and placed at t = 1, as "logsnr" extrapolates the top of its grid to t = 1.
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if spacing == "uniform":
            ts = torch.linspace(1.0, self.t_min, steps, dtype=torch.float64)
        elif spacing == "logsnr":
            dense = torch.linspace(1.0, self.t_min, 20001, dtype=torch.float64)
            lam = self.log_snr_half(dense)  # increasing along the descending grid
            # lambda(1) from the interior: a chain's terminal knot may sit below the interpolation floor, or be
            # -inf at zero terminal SNR; the grid still starts at t = 1
            lam[0] = 2 * lam[1] - lam[2]
            target = torch.linspace(float(lam[0]), float(lam[-1]), steps, dtype=torch.float64)
            idx = torch.searchsorted(lam, target).clamp(1, len(dense) - 1)
            width = lam[idx] - lam[idx - 1]
            w = torch.where(width > 0, (target - lam[idx - 1]) / width.clamp_min(1e-300), torch.zeros_like(width))
            ts = dense[idx - 1] + w * (dense[idx] - dense[idx - 1])
        elif spacing == "karras":
            top, bottom = (float(v) for v in self.edm_sigma(torch.tensor([1.0, self.t_min], dtype=torch.float64)))
            ts = self.time_from_edm_sigma(karras_sigmas(steps, bottom, min(top, KARRAS_SIGMA_CAP)))
            ts[-1], ts[0] = self.t_min, 1.0  # exactly the ends of the process's range
        else:
            raise ValueError(f"{type(self).__name__} supports spacing 'uniform', 'logsnr' or 'karras', not {spacing!r}")
        return torch.cat([ts, torch.zeros(1, dtype=torch.float64)])

    def sample_time(self, n: int, generator: torch.Generator | None = None, device="cpu") -> Tensor:
        """Training times t ~ U[t_min, 1]."""
        return self.time_at(rand(n, generator)).to(device)

    def time_at(self, u: Tensor) -> Tensor:
        """The training time at uniform quantile u in [0, 1): t_min + (1 - t_min) u."""
        return self.t_min + (1 - self.t_min) * as_time(u)

    # --- derived quantities --------------------------------------------------------------------
    def alpha(self, t: float | Tensor) -> Tensor:
        return self.log_alpha(as_time(t)).exp()

    def sigma(self, t: float | Tensor) -> Tensor:
        return self.sigma2(as_time(t)).sqrt()

    def snr(self, t: float | Tensor) -> Tensor:
        """Signal-to-noise ratio alpha^2 / sigma^2 (Kingma et al. 2021)."""
        t = as_time(t)
        return (2 * self.log_alpha(t)).exp() / self.sigma2(t)

    def log_snr_half(self, t: float | Tensor) -> Tensor:
        """lambda(t) = log(alpha / sigma), the DPM-Solver time variable."""
        t = as_time(t)
        return self.log_alpha(t) - 0.5 * self.sigma2(t).log()

    def edm_sigma(self, t: float | Tensor) -> Tensor:
        """sigma_edm(t) = sigma / alpha = exp(-lambda): the noise level of x_t / alpha (Karras et al. 2022, Eq. 4)."""
        return (-self.log_snr_half(t)).exp()

    def time_from_log_snr_half(self, lam: float | Tensor) -> Tensor:
        """The time t in [0, 1] with lambda(t) = lam, by bisection (lambda decreases in t); beyond lambda's range
        the nearest end, 0 or 1. Processes with a closed-form inverse override it."""
        lam = as_time(lam)
        flat = lam.reshape(-1)
        lo, hi = torch.zeros_like(flat), torch.ones_like(flat)
        for _ in range(64):  # 2^-64: below float64 resolution on [0, 1]
            mid = 0.5 * (lo + hi)
            early = self.log_snr_half(mid) > flat  # mid lies before the wanted time
            lo, hi = torch.where(early, mid, lo), torch.where(early, hi, mid)
        hi = torch.where(flat == -math.inf, torch.ones_like(hi), hi)  # zero SNR: exactly t = 1
        return hi.reshape(lam.shape)

    def time_from_edm_sigma(self, sigma_edm: float | Tensor) -> Tensor:
        """Inverse of edm_sigma."""
        return self.time_from_log_snr_half(-as_time(sigma_edm).log())

    def d_alpha(self, t: float | Tensor) -> Tensor:
        """d alpha / dt = f(t) alpha(t)."""
        return self.dlog_alpha_dt(as_time(t)) * self.alpha(t)

    def d_sigma(self, t: float | Tensor) -> Tensor:
        """d sigma / dt = (d sigma^2 / dt) / (2 sigma)."""
        return self.dsigma2_dt(as_time(t)) / (2 * self.sigma(t))

    def ode_velocity(self, x0: Tensor, eps: Tensor, t: float | Tensor) -> Tensor:
        """The probability-flow ODE dx/dt = f x - g^2 score / 2 (Song et al. 2021, Eq. 13) at the estimates (x0, eps)
        of x = alpha x0 + sigma eps: with score = -eps / sigma it is alpha'(t) x0 + sigma'(t) eps, finite at
        alpha = 0."""
        return bcast(self.d_alpha(t), x0) * x0 + bcast(self.d_sigma(t), eps) * eps

    def f(self, t: float | Tensor) -> Tensor:
        """Drift coefficient: f(x, t) = f(t) x."""
        return self.dlog_alpha_dt(as_time(t))

    def g2(self, t: float | Tensor) -> Tensor:
        """Squared diffusion coefficient g(t)^2 = d sigma^2/dt - 2 f(t) sigma^2."""
        t = as_time(t)
        return self.dsigma2_dt(t) - 2 * self.dlog_alpha_dt(t) * self.sigma2(t)

    def drift(self, x: Tensor, t: float | Tensor) -> Tensor:
        return bcast(self.f(t), x) * x

    def diffusion(self, t: float | Tensor) -> Tensor:
        return self.g2(t).clamp_min(0).sqrt()

    def marginal(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Sample q(x_t | x0) = N(alpha x0, sigma^2 I) with the given noise (Ho et al. Eq. 4)."""
        return bcast(self.alpha(t), x0) * x0 + bcast(self.sigma(t), x0) * eps

    def transition(self, t: float | Tensor, s: float | Tensor) -> tuple[Tensor, Tensor]:
        """q(x_t | x_s) = N(a x_s, var I) for s < t: a = alpha_t / alpha_s, var = sigma_t^2 - a^2 sigma_s^2."""
        t, s = as_time(t), as_time(s)
        a = (self.log_alpha(t) - self.log_alpha(s)).exp()
        var = self.sigma2(t) - a**2 * self.sigma2(s)
        return a, var.clamp_min(0)

    def posterior_variance(self, t: float | Tensor, s: float | Tensor) -> Tensor:
        """Variance of q(x_s | x_t, x0): sigma_{t|s}^2 sigma_s^2 / sigma_t^2 (beta_tilde of Ho et al. Eq. 7)."""
        _, var_ts = self.transition(t, s)
        return var_ts * self.sigma2(as_time(s)) / self.sigma2(as_time(t))

    def posterior(self, x_t: Tensor, x0: Tensor, t: float | Tensor, s: float | Tensor) -> tuple[Tensor, Tensor]:
        """q(x_s | x_t, x0) mean and variance (Ho et al. Eq. 6-7; Kingma et al. 2021 Eq. 31-33 for general s < t)."""
        a, var_ts = self.transition(t, s)
        s2_s, s2_t = self.sigma2(as_time(s)), self.sigma2(as_time(t))
        mean = bcast(a * s2_s / s2_t, x_t) * x_t + bcast(self.alpha(s) * var_ts / s2_t, x0) * x0
        return mean, var_ts * s2_s / s2_t

    def prior_sample(self, shape: tuple[int, ...], generator=None, device="cpu", dtype=torch.float32,
                     t: float = 1.0) -> Tensor:
        """x_t ~ N(0, (alpha(t)^2 + sigma(t)^2) I): the marginal at t of unit-variance data, where a solver starts.

        For VP processes this is N(0, I) (diffusers' init_noise_sigma = 1); for VE it is ~N(0, sigma_max^2 I).
        """
        t = as_time(t)
        std = float(((2 * self.log_alpha(t)).exp() + self.sigma2(t)).sqrt())
        return randn(shape, generator, device, dtype) * std

    def prior_logp(self, x: Tensor, t: float = 1.0) -> Tensor:
        """log N(x; 0, (alpha(t)^2 + sigma(t)^2) I) per sample (B,): the density prior_sample draws from, the
        log p_T term of a likelihood (Song et al. 2021, App. D.2)."""
        t = as_time(t)
        var = float((2 * self.log_alpha(t)).exp() + self.sigma2(t))
        sq = x.flatten(1).pow(2).sum(1)  # (B,)
        return -0.5 * (sq / var + x[0].numel() * math.log(2 * math.pi * var))

    def reverse_drift(self, x: Tensor, t: float | Tensor, score: Tensor, probability_flow: bool = False) -> Tensor:
        """Reverse SDE drift f x - g^2 score, or the probability-flow ODE drift f x - g^2 score / 2."""
        weight = 0.5 if probability_flow else 1.0
        return self.drift(x, t) - weight * bcast(self.g2(t), x) * score

    def reverse(self, score_fn: Callable[[Tensor, Tensor], Tensor], probability_flow: bool = False):
        """The reverse-time SDE (or probability-flow ODE) as (drift(x, t), diffusion(t)) callables."""
        drift = lambda x, t: self.reverse_drift(x, t, score_fn(x, t), probability_flow)  # noqa: E731
        diffusion = (lambda t: torch.zeros(())) if probability_flow else self.diffusion  # noqa: E731
        return drift, diffusion


def bcast(coef: Tensor, x: Tensor) -> Tensor:
    """Broadcast a scalar or per-sample (B,) coefficient against x (B, ...) in x's dtype."""
    coef = to_device(coef, x.device, x.dtype)
    return coef.reshape(coef.shape + (1,) * (x.dim() - coef.dim())) if coef.dim() else coef


class DiscreteVP(GaussianProcess):
    """The DDPM chain of a discrete schedule, embedded in continuous time at t_n = (n + 1) / T.

    At the knots t_n, alpha^2 is the chain's alpha_bar_n exactly (so a zero-terminal-SNR chain has alpha(1) = 0,
    as diffusers' DDPMScheduler/DDIMScheduler). Between knots log alpha_bar is linear in t, with alpha_bar values
    below 2^-24 entering the interpolation as 2^-24 (diffusers' convention for continuous-sigma schedulers) so
    drift, diffusion and log-SNR stay finite for continuous-time solvers.
    """

    def __init__(self, betas: Tensor):
        self.betas = betas.to(torch.float64)
        self.T = len(betas)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)  # (T,)
        self._exact = torch.cat([torch.zeros(1, dtype=torch.float64), self.alphas_cumprod.log()])  # (T+1,), may be -inf
        self._knots = self._exact.clamp_min(LOG_ALPHA_BAR_FLOOR)
        self._exact_list, self._knots_list = self._exact.tolist(), self._knots.tolist()  # scalar fast path
        self._scalar_memo: dict[float, tuple[Tensor, Tensor]] = {}
        self.t_min = 1.0 / self.T

    def _log_alpha_bar(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Piecewise-linear log alpha_bar(t) (exact at the knots) and its slope d/dt (of the interval to the right)."""
        if t.dim() == 0:  # samplers ask for one time at a time, repeatedly: python floats, memoised
            key = float(t)
            hit = self._scalar_memo.get(key)
            if hit is None:
                if len(self._scalar_memo) > 100_000:
                    self._scalar_memo.clear()
                hit = self._scalar_memo[key] = self._log_alpha_bar_scalar(key)
            return hit
        pos = t * self.T
        near = pos.round()
        on_knot = (pos - near).abs() < 1e-8  # t = (n + 1) / T up to float rounding
        pos = torch.where(on_knot, near, pos)
        idx = pos.floor().clamp(0, self.T - 1).long()
        left, right = self._knots[idx], self._knots[idx + 1]
        value = left + (pos - idx) * (right - left)
        exact = self._exact[near.clamp(0, self.T).long()]
        value = torch.where(on_knot & (near >= 0) & (near <= self.T), exact, value)
        return value, (right - left) * self.T

    def _log_alpha_bar_scalar(self, t: float) -> tuple[Tensor, Tensor]:
        """The same arithmetic as the batched path on python floats (bit-identical results)."""
        pos = t * self.T
        near = round(pos)
        on_knot = abs(pos - near) < 1e-8
        pos = float(near) if on_knot else pos
        idx = min(max(math.floor(pos), 0), self.T - 1)
        left, right = self._knots_list[idx], self._knots_list[idx + 1]
        value = self._exact_list[near] if on_knot and 0 <= near <= self.T else left + (pos - idx) * (right - left)
        return torch.tensor(value, dtype=torch.float64), torch.tensor((right - left) * self.T, dtype=torch.float64)

    def log_alpha(self, t):
        return 0.5 * self._log_alpha_bar(t)[0]

    def sigma2(self, t):
        return -torch.expm1(self._log_alpha_bar(t)[0])

    def dlog_alpha_dt(self, t):
        return 0.5 * self._log_alpha_bar(t)[1]

    def dsigma2_dt(self, t):
        value, slope = self._log_alpha_bar(t)
        return -value.exp() * slope

    def model_time(self, t):
        return as_time(t) * self.T - 1

    def time_from_model(self, m):
        return (as_time(m) + 1) / self.T

    def timesteps(self, steps: int, spacing: str = "trailing") -> Tensor:
        """Discrete grids as diffusers builds them ('leading', 'trailing', 'linspace'; Lin et al. 2023, Tab. 2),
        or the continuous 'uniform' / 'logsnr' / 'karras' grids."""
        if spacing in ("uniform", "logsnr", "karras"):
            return super().timesteps(steps, spacing)
        if not 1 <= steps <= self.T:
            raise ValueError(f"steps must be in [1, {self.T}], got {steps}")
        # the float arithmetic of numpy's arange / linspace in diffusers, so ties at .5 round the same way
        i = torch.arange(steps, dtype=torch.float64)
        if spacing == "leading":
            n = (i * (self.T // steps)).flip(0)
        elif spacing == "trailing":  # T + i delta for i < steps: a float arange can yield steps + 1 points
            delta = (self.T - self.T / steps) - self.T
            n = (self.T + i * delta).round() - 1
        elif spacing == "linspace":
            n = i * ((self.T - 1) / (steps - 1)) if steps > 1 else i
            n[-1] = self.T - 1 if steps > 1 else 0
            n = n.round().flip(0)
        else:
            raise ValueError(f"unknown spacing {spacing!r}; choose leading, trailing, linspace, uniform, logsnr or "
                             "karras")
        return torch.cat([(n + 1) / self.T, torch.zeros(1, dtype=torch.float64)])

    def time_at(self, u: Tensor) -> Tensor:
        """Training times: n = floor(u T) ~ U{0..T-1} for u ~ U[0, 1), placed at t = (n + 1) / T."""
        idx = (as_time(u) * self.T).floor().clamp(max=self.T - 1)  # uniform on {0..T-1}
        return (idx + 1) / self.T


class VPSDE(GaussianProcess):
    """Variance-preserving SDE with beta(t) = beta_min + t (beta_max - beta_min) (Song et al. Eq. 11)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, time_scale: float = 999.0, t_min: float = 1e-3):
        self.beta_min, self.beta_max, self.time_scale, self.t_min = beta_min, beta_max, time_scale, t_min

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t):
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def sigma2(self, t):
        return -torch.expm1(2 * self.log_alpha(t))

    def dlog_alpha_dt(self, t):
        return -0.5 * self.beta(t)

    def dsigma2_dt(self, t):
        return (2 * self.log_alpha(t)).exp() * self.beta(t)

    def model_time(self, t):
        return as_time(t) * self.time_scale

    def time_from_model(self, m):
        return as_time(m) / self.time_scale


class SubVPSDE(VPSDE):
    """Sub-VP SDE: the VP drift with g^2 = beta(t) (1 - exp(-2 int beta)); sigma = 1 - alpha^2 (Song et al. Eq. 17)."""

    def sigma2(self, t):
        return torch.expm1(2 * self.log_alpha(t)) ** 2

    def dsigma2_dt(self, t):
        a2 = (2 * self.log_alpha(t)).exp()
        return 2 * (1 - a2) * a2 * self.beta(t)


class VESDE(GaussianProcess):
    """Variance-exploding SDE: alpha = 1, sigma(t) = sigma_min (sigma_max / sigma_min)^t (Song et al. Eq. 9)."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-5):
        self.sigma_min, self.sigma_max, self.t_min = sigma_min, sigma_max, t_min
        self._log_ratio = math.log(sigma_max / sigma_min)

    def log_alpha(self, t):
        return torch.zeros_like(t)

    def sigma2(self, t):
        return (self.sigma_min * (t * self._log_ratio).exp()) ** 2

    def dlog_alpha_dt(self, t):
        return torch.zeros_like(t)

    def dsigma2_dt(self, t):
        return 2 * self._log_ratio * self.sigma2(t)

    def model_time(self, t):
        """The network is conditioned on log sigma(t) (NCSN convention)."""
        return 0.5 * self.sigma2(as_time(t)).log()

    def time_from_model(self, m):
        return (as_time(m) - math.log(self.sigma_min)) / self._log_ratio

    def time_from_log_snr_half(self, lam):
        """log sigma(t) = -lambda is linear in t: t = (-lambda - log sigma_min) / log(sigma_max / sigma_min)."""
        return self.time_from_model(-as_time(lam)).clamp(0, 1)


class DiscreteVE(VESDE):
    """NCSN's L geometric noise levels sigma_max = sigma_1 > ... > sigma_L = sigma_min (Song & Ermon 2019, Sec. 4.2)
    as a VE process.

    Level i in {0..L-1} (increasing sigma, i.e. sigma_{L-i}) sits at t_i = (i + 1) / L, as the steps of DiscreteVP
    do, and sigma(t) = sigma_min (sigma_max / sigma_min)^((L t - 1) / (L - 1)) is geometric in between, so
    continuous-time solvers run on it too. Training draws one of the L levels uniformly (the sum over levels of
    NCSN's Eq. 6); the uniform solver grid with steps = L visits exactly the L levels, largest first (their Alg. 1).
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, levels: int = 10):
        if levels < 2:
            raise ValueError(f"DiscreteVE needs at least 2 noise levels, got {levels}")
        super().__init__(sigma_min, sigma_max, t_min=1.0 / levels)
        self.levels = levels
        self._rate = self._log_ratio * levels / (levels - 1)  # d log sigma / dt

    def sigma2(self, t):
        return (self.sigma_min * ((t - self.t_min) * self._rate).exp()) ** 2

    def dsigma2_dt(self, t):
        return 2 * self._rate * self.sigma2(t)

    def time_from_model(self, m):
        return (as_time(m) - math.log(self.sigma_min)) / self._rate + self.t_min

    def noise_levels(self) -> Tensor:
        """sigma_1 > ... > sigma_L (L,), largest first, the order annealed Langevin visits them."""
        return self.sigma(torch.arange(self.levels, 0, -1, dtype=torch.float64) / self.levels)

    def time_at(self, u: Tensor) -> Tensor:
        """Training times: level i = floor(u L), one of the L levels uniformly for u ~ U[0, 1), at t = (i + 1) / L."""
        idx = (as_time(u) * self.levels).floor().clamp(max=self.levels - 1)  # uniform on {0..L-1}
        return (idx + 1) / self.levels
