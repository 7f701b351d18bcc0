"""Likelihoods of diffusion models: the probability-flow ODE (exact) and the DDPM variational bound.

* log p(x) by the instantaneous change of variables (Chen et al. 2018, Thm. 1) along the probability-flow ODE
  dx/dt = v(x, t) = f(t) x - g(t)^2 score / 2 (Song et al. 2021, Eq. 13; likelihoods in their Sec. 4.3, App. D.2):

      log p_{t0}(x(t0)) = log p_1(x(1)) + int_{t0}^{1} div v(x(t), t) dt,

  integrated from the data at t0 (default the process's t_min, the smallest time the model is trained on, as
  Song et al. start at eps = 1e-5) up to t = 1, where ``process.prior_logp`` is the prior. The divergence is
  exact (D vector-Jacobian products: small D only) or the Skilling-Hutchinson estimate E_z[z^T (dv/dx) z]
  (Hutchinson 1989) with Rademacher z held fixed along a solve (Grathwohl et al. 2019, FFJORD). On a fixed
  grid the x path does not depend on z and log p is linear in the trace estimates, so the estimate is an
  unbiased estimate of the same solver's exact-trace value.
  By default the ODE runs in u = -lambda, lambda = log(alpha / sigma) (the DPM-Solver variable, Lu et al. 2022):
  dt/du = 2 sigma^2 / g^2 since d lambda/dt = -g^2 / (2 sigma^2). On the DDPM chain log alpha_bar is piecewise
  linear in t, so f(t) and g(t)^2 are staircases in t that aliase with any Runge-Kutta grid, while in u the
  coefficients (e.g. f dt/du = sigma^2 on VP) are smooth and the solver converges at its order.
* The DDPM variational bound (Ho et al. 2020, Eq. 5; Sohl-Dickstein et al. 2015) of a DiscreteVP chain:

      log p(x0) >= -[KL(q(x_T|x0) || p(x_T)) + sum_{k=2}^{T} E_q KL(q(x_{k-1}|x_k, x0) || p(x_{k-1}|x_k))
                     - E_q log p(x0 | x_1)],

  p(x_{k-1} | x_k) = N(mu(x_k, x0_hat), s_k^2 I) with the posterior mean at the model's x0 estimate and
  s_k^2 = beta_tilde_k ("small") or beta_k ("large") (Ho et al. Sec. 3.2); the decoder is the Gaussian
  N(x0_hat(x_1), beta_1 I) in both cases (beta_tilde_1 = 0 would make it degenerate).

Bits per dimension = -log p / (D ln 2). The data are continuous latents: no dequantisation and no 8-bit
discretised decoder (Ho et al. Sec. 3.3) enter, so these are differential log-densities and can be negative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ldm.diffusion.parameterization import Predictor
from ldm.diffusion.sde import DiscreteVP, randn

Tensor = torch.Tensor
FIXED_STEP = ("euler", "heun", "rk4")
METHODS = (*FIXED_STEP, "rk45")

# Dormand & Prince 5(4) with first-same-as-last (Hairer, Norsett & Wanner 1993, Sec. II.5, Table 5.2)
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_DP_A = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
         (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
         (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656))
_DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)  # 5th order; 7th stage weight 0
_DP_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)  # b5 - b4 over 7 stages


def bits_per_dim(logp: Tensor, dim: int) -> Tensor:
    """-log p / (D ln 2): nats of a D-dimensional density to bits per dimension."""
    return -logp / (dim * math.log(2))


# ----------------------------------------------------------------------------------------------------------
# ODE integration


def odeint(fn: Callable[[Tensor, float], Tensor], y: Tensor, t0: float, t1: float, *, method: str = "rk45",
           steps: int | None = None, rtol: float = 1e-5, atol: float = 1e-5,
           max_steps: int = 100_000) -> tuple[Tensor, int]:
    """Integrate dy/dt = fn(y, t) from t0 to t1 > t0; returns (y(t1), number of fn evaluations).

    Fixed-step "euler", "heun" (2nd order) or classical "rk4" take ``steps``; adaptive "rk45" is Dormand-Prince
    with the standard step-size controller (Hairer et al. 1993, Sec. II.4): a step is accepted when
    max |err| / (atol + rtol max(|y|, |y_new|)) <= 1 over every element, so one step size serves the batch.
    """
    if method not in METHODS:
        raise ValueError(f"unknown ODE method {method!r}; choose from {METHODS}")
    if not t1 > t0:
        raise ValueError(f"integrate forward: need t1 > t0, got t0={t0}, t1={t1}")
    if method in FIXED_STEP:
        if steps is None or steps < 1:
            raise ValueError(f"method {method!r} needs steps >= 1, got {steps}")
        return _fixed(fn, y, t0, t1, method, steps)
    if rtol <= 0 or atol <= 0:
        raise ValueError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}")
    return _dopri5(fn, y, t0, t1, rtol, atol, max_steps)


def _fixed(fn, y: Tensor, t0: float, t1: float, method: str, steps: int) -> tuple[Tensor, int]:
    h = (t1 - t0) / steps
    per_step = {"euler": 1, "heun": 2, "rk4": 4}[method]
    for i in range(steps):
        t = t0 + i * h
        k1 = fn(y, t)
        if method == "euler":
            y = y + h * k1
        elif method == "heun":
            y = y + 0.5 * h * (k1 + fn(y + h * k1, t + h))
        else:
            k2 = fn(y + 0.5 * h * k1, t + 0.5 * h)
            k3 = fn(y + 0.5 * h * k2, t + 0.5 * h)
            k4 = fn(y + h * k3, t + h)
            y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return y, steps * per_step


def _dopri5(fn, y: Tensor, t0: float, t1: float, rtol: float, atol: float, max_steps: int) -> tuple[Tensor, int]:
    def norm(v: Tensor, scale: Tensor) -> float:
        return float((v / scale).abs().max())

    k1 = fn(y, t0)
    # starting step size (Hairer et al. 1993, Sec. II.4)
    scale = atol + rtol * y.abs()
    d0, d1 = norm(y, scale), norm(k1, scale)
    h0 = 1e-6 if min(d0, d1) < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, t1 - t0)
    d2 = norm(fn(y + h0 * k1, t0 + h0) - k1, scale) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** 0.2
    h = min(100 * h0, h1)
    t, nfe, taken = t0, 2, 0
    while t < t1:
        if taken >= max_steps:
            raise RuntimeError(f"rk45 took {max_steps} steps without reaching t={t1} (at t={t}); loosen rtol/atol")
        h = min(h, t1 - t)
        ks = [k1]
        for c, row in zip(_DP_C[1:], _DP_A[1:]):
            ks.append(fn(y + h * sum(a * k for a, k in zip(row, ks) if a), t + c * h))
        y_new = y + h * sum(b * k for b, k in zip(_DP_B, ks) if b)
        k7 = fn(y_new, t + h)
        nfe += 6
        err = h * sum(e * k for e, k in zip(_DP_E, [*ks, k7]) if e)
        ratio = norm(err, atol + rtol * torch.maximum(y.abs(), y_new.abs()))
        taken += 1
        if ratio <= 1.0:
            t = t1 if t1 - (t + h) <= 1e-12 * max(1.0, abs(t1)) else t + h
            y, k1 = y_new, k7
            h *= min(10.0, 0.9 * ratio ** -0.2) if ratio > 0 else 10.0
        else:
            h *= max(0.2, 0.9 * ratio ** -0.2)
    return y, nfe


# ----------------------------------------------------------------------------------------------------------
# probability-flow ODE likelihood


def divergence(fn: Callable[[Tensor], Tensor], x: Tensor, probes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(fn(x), div fn(x) (B,)) for a per-sample map of x (B, ...): the exact Jacobian trace (probes None, D
    backward passes) or the Hutchinson mean of z^T (d fn / dx) z over probes (K, B, ...)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = fn(x)  # (B, ...)
        if probes is None:
            flat = v.flatten(1)  # (B, D)
            div = sum(torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)[0].flatten(1)[:, i]
                      for i in range(flat.shape[1]))
        else:
            div = sum((torch.autograd.grad((v * z).sum(), x, retain_graph=True)[0] * z).flatten(1).sum(1)
                      for z in probes) / len(probes)
    return v.detach(), div.detach()


@dataclass
class Likelihood:
    """Per-sample results of ``ode_likelihood`` (nats)."""

    logp: Tensor  # (B,) log p_{t0}(x)
    prior_logp: Tensor  # (B,) log p_1(x(1))
    delta_logp: Tensor  # (B,) int_{t0}^{1} div v dt
    nfe: int  # network evaluations (each with its divergence)
    dim: int

    @property
    def bpd(self) -> Tensor:
        return bits_per_dim(self.logp, self.dim)


def time_at_log_snr(process, lam: float, lo: float, hi: float) -> float:
    """The t in [lo, hi] with lambda(t) = lam: Newton's method on d lambda/dt = -g^2 / (2 sigma^2), kept inside a
    shrinking bracket by bisection (lambda decreases in t for every process)."""
    t = 0.5 * (lo + hi)
    for _ in range(200):
        tt = torch.tensor(t, dtype=torch.float64)
        gap = float(process.log_snr_half(tt)) - lam
        if gap == 0:
            return t
        lo, hi = (t, hi) if gap > 0 else (lo, t)
        slope = -float(process.g2(tt) / (2 * process.sigma2(tt)))
        new = t - gap / slope if slope < 0 else 0.5 * (lo + hi)
        if not lo < new < hi:
            new = 0.5 * (lo + hi)
        if abs(new - t) <= 4e-16 * max(1.0, abs(t)):
            return new
        t = new
    return t


def ode_likelihood(model: Predictor, x: Tensor, cond: Any = None, *, method: str = "rk45", steps: int | None = None,
                   rtol: float = 1e-5, atol: float = 1e-5, exact_trace: bool = False, probes: int = 1,
                   t0: float | None = None, time: str = "logsnr", prior_logp: Callable[[Tensor], Tensor] | None = None,
                   generator: torch.Generator | list[torch.Generator] | None = None) -> Likelihood:
    """log p_{t0}(x) per sample under the probability-flow ODE of ``model`` (see the module docstring).

    ``time`` is the integration variable: "logsnr" (u = -lambda, default) or "t" (needed when lambda(1) is
    -inf, i.e. zero terminal SNR). ``prior_logp`` replaces the process's Gaussian prior at t = 1 (e.g. a known
    exact p_1 in tests); the Hutchinson probes (``probes`` Rademacher vectors per sample) come from ``generator``.
    """
    p = model.process
    t0 = p.t_min if t0 is None else float(t0)
    if time not in ("logsnr", "t"):
        raise ValueError(f"time must be 'logsnr' or 't', got {time!r}")
    u0, u1 = -float(p.log_snr_half(t0)), -float(p.log_snr_half(1.0))
    if time == "logsnr" and not math.isfinite(u1):
        raise ValueError("lambda(1) = log(alpha/sigma) is -inf (zero terminal SNR): integrate in time='t'")
    B, shape, D = x.shape[0], tuple(x.shape[1:]), x[0].numel()
    z = None
    if not exact_trace:
        if probes < 1:
            raise ValueError(f"probes must be >= 1, got {probes}")
        z = randn((B, probes, *shape), generator, x.device, x.dtype).sign().transpose(0, 1)  # (K, B, ...) +-1

    def fn_t(y: Tensor, t: float) -> Tensor:
        xt = y[:, :D].reshape(B, *shape)  # (B, ...)
        v, div = divergence(lambda u: p.reverse_drift(u, t, model.score(u, t, cond), probability_flow=True), xt, z)
        return torch.cat([v.flatten(1), div[:, None].to(v)], 1)  # (B, D + 1): d(x, delta log p)/dt

    def fn_u(y: Tensor, u: float) -> Tensor:
        t = t0 if u <= u0 else 1.0 if u >= u1 else time_at_log_snr(p, -u, t0, 1.0)
        return fn_t(y, t) * float(2 * p.sigma2(torch.tensor(t, dtype=torch.float64)) / p.g2(t))  # dt/du

    y0 = torch.cat([x.flatten(1), torch.zeros(B, 1, dtype=x.dtype, device=x.device)], 1)  # (B, D + 1)
    if time == "t":
        y1, nfe = odeint(fn_t, y0, t0, 1.0, method=method, steps=steps, rtol=rtol, atol=atol)
    else:
        y1, nfe = odeint(fn_u, y0, u0, u1, method=method, steps=steps, rtol=rtol, atol=atol)
    x1, delta = y1[:, :D].reshape(B, *shape), y1[:, D]
    prior = prior_logp(x1) if prior_logp is not None else p.prior_logp(x1, 1.0)
    return Likelihood(prior + delta, prior, delta, nfe, D)


# ----------------------------------------------------------------------------------------------------------
# DDPM variational bound


def gaussian_kl(mean_q: Tensor, var_q: float, mean_p: Tensor, var_p: float) -> Tensor:
    """KL(N(mean_q, var_q I) || N(mean_p, var_p I)) per sample (B,), isotropic variances as numbers."""
    D = mean_q[0].numel()
    sq = (mean_q - mean_p).flatten(1).pow(2).sum(1)  # (B,)
    return 0.5 * (D * (math.log(var_p / var_q) + var_q / var_p - 1) + sq / var_p)


def gaussian_nll(x: Tensor, mean: Tensor, var: float) -> Tensor:
    """-log N(x; mean, var I) per sample (B,)."""
    return 0.5 * ((x - mean).flatten(1).pow(2).sum(1) / var + x[0].numel() * math.log(2 * math.pi * var))


@dataclass
class ELBO:
    """The terms of the DDPM bound per sample (nats): -elbo = prior + diffusion + decoder >= -log p(x0)."""

    prior: Tensor  # (B,) KL(q(x_T | x0) || p(x_T))
    diffusion: Tensor  # (B,) sum_{k=2}^{T} E_q KL(q(x_{k-1} | x_k, x0) || p(x_{k-1} | x_k))
    decoder: Tensor  # (B,) -E_q log p(x0 | x_1)
    dim: int

    @property
    def elbo(self) -> Tensor:
        return -(self.prior + self.diffusion + self.decoder)

    @property
    def bpd(self) -> Tensor:
        """The bound in bits/dim: an upper bound on the negative log-likelihood."""
        return bits_per_dim(self.elbo, self.dim)


def _geometric_edges(first: int, end: int, blocks: int) -> list[int]:
    """blocks + 1 strictly increasing integer edges from first to end, geometric where the integers allow."""
    ratio = end / first
    edges = [first]
    for j in range(1, blocks):
        edges.append(max(edges[-1] + 1, round(first * ratio ** (j / blocks))))
    return edges + [end]


@torch.no_grad()
def ddpm_elbo(model: Predictor, x0: Tensor, cond: Any = None, *, variance: str = "small", terms: int | None = None,
              generator: torch.Generator | list[torch.Generator] | None = None) -> ELBO:
    """The DDPM variational bound of x0 (see the module docstring), one draw of x_k ~ q(x_k | x0) per term.

    ``terms`` < T - 1 estimates the sum of the T - 1 KL terms without bias by stratified sampling: the steps split
    into ``terms`` contiguous blocks whose edges grow geometrically in k, one uniformly drawn term per block weighted
    by the block's size. For a learned model the terms fall roughly like 1/k (tiny reverse variances at the first
    steps), so the first steps get blocks of their own and the long flat tail shares a few; a uniform random subset
    misses the large terms and varies by several bits/dim between draws. The draw comes from the generator (the
    first one of a per-sample list).
    """
    p = model.process
    if not isinstance(p, DiscreteVP):
        raise ValueError(f"the DDPM bound is defined for the discrete chain (DiscreteVP), not {type(p).__name__}; "
                         "use ode_likelihood for continuous processes")
    if variance not in ("small", "large"):
        raise ValueError(f"variance must be 'small' or 'large', got {variance!r}")
    T, D = p.T, x0[0].numel()

    def noisy(t: float) -> Tensor:
        return p.marginal(x0, torch.tensor(t, dtype=torch.float64), randn(tuple(x0.shape), generator, x0.device,
                                                                             x0.dtype))

    alpha_T, var_T = float(p.alpha(1.0)), float(p.sigma(1.0)) ** 2
    prior = gaussian_kl(alpha_T * x0, var_T, torch.zeros_like(x0), alpha_T**2 + var_T)  # the prior_logp density

    ks, weights = list(range(2, T + 1)), [1.0] * (T - 1)
    if terms is not None and terms < T - 1:
        if terms < 1:
            raise ValueError(f"terms must be >= 1, got {terms}")
        g = generator[0] if isinstance(generator, (list, tuple)) else generator
        edges = _geometric_edges(2, T + 1, terms)  # blocks [edges[j], edges[j + 1]) of steps
        sizes = [b - a for a, b in zip(edges[:-1], edges[1:])]
        pick = torch.rand(terms, generator=g, dtype=torch.float64)  # one uniform term per block
        ks = [a + min(int(u * n), n - 1) for a, n, u in zip(edges, sizes, pick.tolist())]
        weights = [float(n) for n in sizes]
    diffusion = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
    for k, weight in zip(ks, weights):
        t, s = k / T, (k - 1) / T
        x_t = noisy(t)
        x0_hat = model(x_t, t, cond)[0]
        mean_q, var_q = p.posterior(x_t, x0, t, s)
        mean_p = p.posterior(x_t, x0_hat, t, s)[0]
        var_p = var_q if variance == "small" else p.transition(t, s)[1]
        diffusion += weight * gaussian_kl(mean_q, float(var_q), mean_p, float(var_p)).double()

    t1 = 1 / T  # the decoder p(x0 | x_1) = N(x0_hat(x_1), beta_1 I); sigma(t_1)^2 = 1 - alpha_bar_1 = beta_1
    decoder = gaussian_nll(x0, model(noisy(t1), t1, cond)[0], float(p.sigma(t1)) ** 2)
    return ELBO(prior.double(), diffusion, decoder.double(), D)
