"""Multistep exponential-integrator solvers beyond DPM-Solver++(2M), in lambda = log(alpha / sigma).

With data prediction x0(x, lambda) the probability-flow ODE has the exact solution (Lu et al. 2022b, "DPM-Solver++",
Sec. 4) x_s = (sigma_s / sigma_t) x_t + sigma_s int_{lambda_t}^{lambda_s} e^l x0(l) dl; the solvers differ in how
they expand x0 in lambda from the estimates already computed (one network evaluation per step):

* ``dpm_solver_pp_3m``: DPM-Solver++(3M), the 3rd-order multistep expansion (Lu et al. 2022b, Sec. 4 with the
  third-order terms of Lu et al. 2022a, Sec. 3; the form of diffusers' DPMSolverMultistepScheduler).
* ``dpm_solver_pp_2m_sde``: SDE-DPM-Solver++(2M) (Lu et al. 2022b, Sec. 5 and App.): the exact integrator of
  the reverse SDE in lambda with a 2nd-order multistep x0, noise sigma_s sqrt(1 - e^{-2h}) z.
* ``unipc``: UniPC (Zhao et al. 2023): the UniP-p predictor with B(h) = e^h - 1 ("bh2") and the UniC corrector,
  which reuses the evaluation at the new point, so order p + 1 at no extra cost (their Sec. 3 and algorithms).

Warm-up uses the lower orders on the first steps, and each solver lowers its order towards the end (diffusers'
``lower_order_final``): the order of step i (of N intervals) is min(order, i + 1, N - i). The final interval
returns the x0 estimate, as every sampler here does.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ldm.diffusion.parameterization import Predictor
from ldm.sampling.steps import Callback, intervals, noise_like

Tensor = torch.Tensor


def _coefficients(p, t: float, s: float) -> tuple[float, float, float, float]:
    """(lambda_t, lambda_s, alpha_s, sigma_s / sigma_t)."""
    return float(p.log_snr_half(t)), float(p.log_snr_half(s)), float(p.alpha(s)), float(p.sigma(s) / p.sigma(t))


@torch.no_grad()
def dpm_solver_pp_3m(model: Predictor, x: Tensor, ts: Tensor, cond: Any = None, generator=None,
                     callback: Callback = None) -> Tensor:
    """DPM-Solver++(3M): x_s = (sigma_s / sigma_t) x - alpha_s (e^-h - 1) D0 + alpha_s ((e^-h - 1) / h + 1) D1
    - alpha_s ((e^-h - 1 + h) / h^2 - 1/2) D2, with D1, D2 the divided differences of the last three x0 in lambda."""
    p = model.process
    pairs = intervals(ts)
    hist: list[tuple[float, Tensor]] = []  # (lambda, x0), newest last
    for i, (t, s, last) in enumerate(pairs):
        x0, _ = model(x, t, cond)
        if callback is not None:
            callback(i, t, x, x0)
        if last:
            return x0
        lam_t, lam_s, alpha_s, ratio = _coefficients(p, t, s)
        hist = (hist + [(lam_t, x0)])[-3:]
        h = lam_s - lam_t
        order = min(3, len(hist), len(pairs) - i)
        em1 = math.expm1(-h)  # e^-h - 1
        x_new = ratio * x - alpha_s * em1 * x0
        if order >= 2:
            r0 = (lam_t - hist[-2][0]) / h
            d1_0 = (x0 - hist[-2][1]) / r0
            if order == 2:  # DPM-Solver++(2M): D = D0 + D1_0 / 2
                x_new = x_new - 0.5 * alpha_s * em1 * d1_0
            else:
                r1 = (hist[-2][0] - hist[-3][0]) / h
                d1_1 = (hist[-2][1] - hist[-3][1]) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi2 = em1 / h + 1  # (e^-h - 1) / h + 1
                phi3 = (em1 + h) / h**2 - 0.5
                x_new = x_new + alpha_s * phi2 * d1 - alpha_s * phi3 * d2
        x = x_new
    return x


@torch.no_grad()
def dpm_solver_pp_2m_sde(model: Predictor, x: Tensor, ts: Tensor, cond: Any = None, generator=None,
                         callback: Callback = None) -> Tensor:
    """SDE-DPM-Solver++(2M), midpoint form: x_s = (sigma_s / sigma_t) e^-h x + alpha_s (1 - e^-2h) (D0 + D1 / 2)
    + sigma_s sqrt(1 - e^-2h) z with D1 = (x0_i - x0_{i-1}) / r, r = h_{i-1} / h (first-order first step)."""
    p = model.process
    pairs = intervals(ts)
    prev: tuple[float, Tensor] | None = None
    for i, (t, s, last) in enumerate(pairs):
        x0, _ = model(x, t, cond)
        if callback is not None:
            callback(i, t, x, x0)
        if last:
            return x0
        lam_t, lam_s, alpha_s, ratio = _coefficients(p, t, s)
        h = lam_s - lam_t
        keep = -math.expm1(-2 * h)  # 1 - e^-2h
        d = x0 if prev is None else x0 + 0.5 * (x0 - prev[1]) * (h / (lam_t - prev[0]))
        noise = float(p.sigma(s)) * math.sqrt(keep) * noise_like(x, generator)
        x = ratio * math.exp(-h) * x + alpha_s * keep * d + noise
        prev = (lam_t, x0)
    return x


def _unipc_rhs(hh: float, order: int) -> list[float]:
    """b_k = k! h phi_{k+1}(h) / B(h), k = 1..order, for h = -h_lambda (data prediction) and B(h) = e^h - 1, with
    phi_1(h) = (e^h - 1) / h and phi_{k+1}(h) = (phi_k(h) - 1/k!) / h (Zhao et al. 2023, Sec. 3, UniPC with B(h))."""
    b, h_phi, factorial = [], math.expm1(hh) / hh - 1, 1.0  # h_phi = h phi_2(h)
    for k in range(1, order + 1):
        b.append(h_phi * factorial / math.expm1(hh))
        factorial *= k + 1
        h_phi = h_phi / hh - 1 / factorial
    return b


def _unipc_update(x: Tensor, hist: list[tuple[float, Tensor]], lam_s: float, alpha_s: float, ratio: float,
                  order: int, x0_new: Tensor | None = None) -> Tensor:
    """UniP-order from the last ``order`` points of ``hist`` (x0_new is None), or UniC-order with the new x0 at lam_s.

    x_s = (sigma_s / sigma_t) x - alpha_s (e^-h - 1) m0 - alpha_s B(h) sum_k rho_k D_k, D_k = (m_k - m0) / r_k,
    r_k = (lambda_k - lambda_t) / h; rho solves sum_k rho_k r_k^(j-1) = b_j (the predictor's 2nd order and the
    corrector's 1st order use rho = 1/2, as the reference implementation)."""
    lam_t, m0 = hist[-1]
    h = lam_s - lam_t
    # a point at lambda = -inf (alpha = 0) is infinitely far: its D_k and rho_k vanish in the limit, so it drops out
    past = [(lam - lam_t) / h for lam, _ in hist[-order:-1][::-1]]
    rs = [r for r in past if math.isfinite(r)]
    ds = [(m - m0) / r for (_, m), r in zip(hist[-order:-1][::-1], past) if math.isfinite(r)]
    if x0_new is not None:
        rs, ds = rs + [1.0], ds + [x0_new - m0]
    b = _unipc_rhs(-h, order)
    if not ds:
        rhos = []
    elif len(ds) == 1:
        rhos = [0.5]
    else:
        R = torch.tensor([[r ** (j - 1) for r in rs] for j in range(1, len(rs) + 1)], dtype=torch.float64)
        rhos = torch.linalg.solve(R, torch.tensor(b[:len(rs)], dtype=torch.float64)).tolist()
    bh = math.expm1(-h)
    out = ratio * x - alpha_s * bh * m0
    for rho, d in zip(rhos, ds):
        out = out - alpha_s * bh * rho * d
    return out


@torch.no_grad()
def unipc(model: Predictor, x: Tensor, ts: Tensor, cond: Any = None, generator=None, order: int = 3,
          corrector: bool = True, callback: Callback = None) -> Tensor:
    """UniPC-p (Zhao et al. 2023, Sec. 3): UniP-p predictor, then UniC-p on each new point (none on the first).

    The corrected state continues the solve; the evaluation at the predicted state is the one stored and reused
    (the corrector costs no evaluation). corrector=False is UniP alone."""
    if not 1 <= order <= 3:
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    p = model.process
    pairs = intervals(ts)
    hist: list[tuple[float, Tensor]] = []
    x_prev, prev_order, prev_coefs = None, 0, None
    for i, (t, s, last) in enumerate(pairs):
        x0, _ = model(x, t, cond)
        if callback is not None:  # the state the model saw, before the corrector moves it
            callback(i, t, x, x0)
        lam_t = float(p.log_snr_half(t))
        if corrector and x_prev is not None and not last:
            x = _unipc_update(x_prev, hist, lam_t, *prev_coefs, prev_order, x0_new=x0)
        if last:
            return x0
        hist = (hist + [(lam_t, x0)])[-order:]
        step_order = min(order, len(hist), len(pairs) - i)
        _, lam_s, alpha_s, ratio = _coefficients(p, t, s)
        x_prev, prev_order, prev_coefs = x, step_order, (alpha_s, ratio)
        x = _unipc_update(x, hist, lam_s, alpha_s, ratio, step_order)
    return x
