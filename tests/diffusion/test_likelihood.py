"""Likelihoods against closed forms: the probability-flow ODE on a Gaussian mixture, the DDPM bound on a Gaussian.

With the exact score and the exact p_1 as prior, the only error of the ODE log-likelihood is the solver's, so it
must fall towards zero as steps grow or rtol shrinks; Hutchinson's estimate must average to the exact-trace value of
the same solver. For a single Gaussian every term of the DDPM bound has a closed form given x0, the expectation
over x_t included, and the bound must lie below the exact log-likelihood (in expectation over the data: it bounds
the model's density, and a Gibbs inequality then bounds the data's).
"""

from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion import VESDE, VPSDE, DiscreteVP, Predictor, ddpm_elbo, make_betas, ode_likelihood, odeint
from tests.sampling.mixture import Mixture, make_mixture

MIX = make_mixture([0.5, 0.3, 0.2], [[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0]], [0.5, 0.3, 0.7])
PROCESSES = {"discrete": lambda: DiscreteVP(make_betas("linear", 1000)), "vp": VPSDE, "ve": VESDE}


def log_density(mix: Mixture, x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """log p_t(x) (B,) of the noisy mixture: sum_k w_k N(x; alpha mu_k, (alpha^2 s_k^2 + sigma^2) I)."""
    v = alpha**2 * mix.stds**2 + sigma**2  # (K,)
    sq = (x[:, None, :] - alpha * mix.means[None]).pow(2).sum(-1)  # (B, K)
    return (mix.weights.log() - 0.5 * sq / v - 0.5 * mix.dim * torch.log(2 * math.pi * v)).logsumexp(1)


def mixture_likelihood(process: str, x: torch.Tensor, **options):
    """ODE log p_{t0}(x) with the exact denoiser and exact prior, and the exact log p_{t0}(x)."""
    p = PROCESSES[process]()
    model = Predictor(MIX.denoiser(p, "eps"), p, "eps")
    prior = lambda z: log_density(MIX, z, float(p.alpha(1.0)), float(p.sigma(1.0)))  # noqa: E731
    result = ode_likelihood(model, x, prior_logp=prior, **options)
    return result, log_density(MIX, x, float(p.alpha(p.t_min)), float(p.sigma(p.t_min)))


def test_odeint_converges_at_each_methods_order():
    """dy/dt = -t y: y(1) = y(0) exp(-1/2); halving h divides the error by 2^order; rk45 meets its tolerance."""
    fn = lambda y, t: -t * y  # noqa: E731
    y0 = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    exact = y0 * math.exp(-0.5)
    for method, order in (("euler", 1), ("heun", 2), ("rk4", 4)):
        errors = [float((odeint(fn, y0, 0.0, 1.0, method=method, steps=n)[0] - exact).abs().max()) for n in (32, 64)]
        assert abs(math.log2(errors[0] / errors[1]) - order) < 0.3, (method, errors)
    for rtol in (1e-4, 1e-8):
        y, nfe = odeint(fn, y0, 0.0, 1.0, rtol=rtol, atol=rtol)
        assert float((y - exact).abs().max()) < 10 * rtol and nfe < 200
    with pytest.raises(ValueError, match="steps"):
        odeint(fn, y0, 0.0, 1.0, method="rk4")


def test_prior_logp_is_the_prior_samplers_density():
    x = torch.randn(5, 3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for p in (VPSDE(), VESDE(), DiscreteVP(make_betas("cosine", 1000))):
        var = float(p.alpha(1.0) ** 2 + p.sigma(1.0) ** 2)
        scale = torch.tensor(math.sqrt(var), dtype=torch.float64)
        normal = torch.distributions.Normal(torch.zeros((), dtype=torch.float64), scale)
        reference = normal.log_prob(x).flatten(1).sum(1)
        torch.testing.assert_close(p.prior_logp(x), reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("process,time", [("discrete", "logsnr"), ("vp", "t"), ("ve", "logsnr")])
def test_ode_likelihood_converges_to_the_mixture_density(process, time, one_thread):
    """|log p_ode - log p| (mean over 32 points, nats) falls at RK4's order as steps double, and with rk45's rtol.

    On the DDPM chain the ODE runs in log-SNR time: in t its drift is a staircase (log alpha_bar is piecewise
    linear) and the error stalls near 3e-4 nats whatever the step count."""
    x, _ = MIX.sample(32, torch.Generator().manual_seed(0))
    errors = []
    for steps in (8, 16, 32):
        result, true = mixture_likelihood(process, x, method="rk4", steps=steps, exact_trace=True, time=time)
        errors.append(float((result.logp - true).abs().mean()))
    assert errors[0] > 4 * errors[1] > 16 * errors[2], errors
    assert errors[2] < 1e-3, errors
    if process == "discrete":
        adaptive = []
        for rtol in (1e-3, 1e-5, 1e-7):
            result, true = mixture_likelihood(process, x, rtol=rtol, atol=rtol, exact_trace=True)
            adaptive.append(float((result.logp - true).abs().mean()))
        assert adaptive[0] > 10 * adaptive[1] > 100 * adaptive[2], adaptive
        assert adaptive[2] < 1e-7, adaptive
        assert result.bpd.shape == (32,) and torch.allclose(result.bpd, -result.logp / (2 * math.log(2)))


def test_hutchinson_estimate_is_unbiased(one_thread):
    """400 independent Rademacher probes per point: the mean matches the exact-trace value of the same RK4 grid
    within 4 standard errors, and the estimate really is random (its spread is far from zero)."""
    points, _ = MIX.sample(4, torch.Generator().manual_seed(1))
    reps = 400
    x = points.repeat_interleave(reps, 0)  # (4 * reps, 2): one independent probe per row
    exact, _ = mixture_likelihood("discrete", points, method="rk4", steps=8, exact_trace=True)
    estimate, _ = mixture_likelihood("discrete", x, method="rk4", steps=8, probes=1,
                                     generator=torch.Generator().manual_seed(2))
    per_point = estimate.logp.view(4, reps)
    standard_error = per_point.std(1) / math.sqrt(reps)
    assert ((per_point.mean(1) - exact.logp).abs() < 4 * standard_error).all(), (per_point.mean(1), exact.logp)
    assert (per_point.std(1) > 1e-3).all()
    # the x path is the same whatever the probes: only the trace integral is random
    torch.testing.assert_close(estimate.prior_logp.view(4, reps)[:, 0], exact.prior_logp, rtol=1e-10, atol=1e-10)


# --- the DDPM bound on a single Gaussian ---------------------------------------------------------------------

MU, S = torch.tensor([0.5, -1.0], dtype=torch.float64), 0.6


def closed_form_elbo(p: DiscreteVP, x0: torch.Tensor | None, variance: str) -> float:
    """The DDPM bound for data N(MU, S^2 I) with the exact denoiser, at x0 (None: its expectation over the data).

    x0_hat(x_k) = MU + g_k (x_k - a_k MU), g_k = a_k S^2 / (a_k^2 S^2 + s_k^2), so given x0 the error x0 - x0_hat
    has E||.||^2 = (1 - g_k a_k)^2 ||x0 - MU||^2 + D g_k^2 s_k^2 (x_k ~ N(a_k x0, s_k^2 I))."""
    ab, betas, D = torch.cumprod(1 - p.betas, 0), p.betas, 2
    dev2 = D * S**2 if x0 is None else float((x0 - MU).pow(2).sum())  # ||x0 - MU||^2 or its expectation

    def err2(k):  # E||x0 - x0_hat(x_k)||^2, k = 1..T
        a2 = float(ab[k - 1])
        g = math.sqrt(a2) * S**2 / (a2 * S**2 + 1 - a2)
        return (1 - g * math.sqrt(a2)) ** 2 * dev2 + D * g**2 * (1 - a2)

    a2T = float(ab[-1])
    mu2 = dev2 + 2 * float(MU @ (MU if x0 is None else x0)) - float(MU @ MU)  # E||x0||^2 or ||x0||^2
    total = 0.5 * (D * (1 - a2T - 1 - math.log(1 - a2T)) + a2T * mu2)  # KL(N(a_T x0, 1 - a2T) || N(0, I))
    for k in range(2, p.T + 1):
        a2, a2_prev, b = float(ab[k - 1]), float(ab[k - 2]), float(betas[k - 1])
        var_q = b * (1 - a2_prev) / (1 - a2)
        var_p = var_q if variance == "small" else b
        c = math.sqrt(a2_prev) * b / (1 - a2)  # the posterior mean's weight on x0 (Ho et al. Eq. 7)
        total += 0.5 * (D * (math.log(var_p / var_q) + var_q / var_p - 1) + c**2 * err2(k) / var_p)
    b1 = float(betas[0])
    total += 0.5 * (err2(1) / b1 + D * math.log(2 * math.pi * b1))  # -E log N(x0; x0_hat(x_1), beta_1 I)
    return -total


@pytest.mark.parametrize("variance", ["small", "large"])
def test_ddpm_elbo_matches_its_closed_form_and_bounds_the_likelihood(variance, one_thread):
    p = DiscreteVP(make_betas("linear", 100))
    model = Predictor(make_mixture([1.0], [MU.tolist()], [S]).denoiser(p, "eps"), p, "eps")
    points = torch.tensor([[0.5, -1.0], [1.4, -0.2], [-0.7, -2.5]], dtype=torch.float64)
    reps = 1000
    result = ddpm_elbo(model, points.repeat_interleave(reps, 0), variance=variance,
                       generator=torch.Generator().manual_seed(0))
    elbo = result.elbo.view(3, reps)
    log_p = -0.5 * ((points - MU).pow(2).sum(1) / S**2 + 2 * math.log(2 * math.pi * S**2))  # (3,)
    for i in range(3):
        closed = closed_form_elbo(p, points[i], variance)
        standard_error = float(elbo[i].std()) / math.sqrt(reps)
        assert abs(float(elbo[i].mean()) - closed) < 4 * standard_error, (i, float(elbo[i].mean()), closed)
        if variance == "small":  # a loose bound: below log p at every point
            assert closed < float(log_p[i]) - 0.5
    # in expectation over the data: E[ELBO] <= E log p_model <= E log p = -entropy
    entropy = 0.5 * 2 * math.log(2 * math.pi * math.e * S**2)
    assert closed_form_elbo(p, None, variance) < -entropy
    torch.testing.assert_close(result.bpd, -result.elbo / (2 * math.log(2)))
    assert (result.prior > 0).all() and (result.diffusion > 0).all()


def test_ddpm_elbo_subset_of_terms_is_unbiased(one_thread):
    """The sum over 99 KL terms estimated from 10, one per geometric block of steps: the mean of 40 estimates
    matches the full sum."""
    p = DiscreteVP(make_betas("linear", 100))
    model = Predictor(make_mixture([1.0], [MU.tolist()], [S]).denoiser(p, "eps"), p, "eps")
    x0 = torch.tensor([[1.4, -0.2]], dtype=torch.float64).repeat(200, 1)
    full = ddpm_elbo(model, x0, generator=torch.Generator().manual_seed(0)).diffusion  # (200,)
    subsets = torch.tensor([float(ddpm_elbo(model, x0, terms=10, generator=torch.Generator().manual_seed(s))
                                  .diffusion.mean()) for s in range(1, 41)])
    # both sides are Monte Carlo estimates (x_k draws; the subset): their standard errors add in quadrature
    standard_error = math.hypot(float(subsets.std()) / math.sqrt(len(subsets)), float(full.std()) / math.sqrt(200))
    assert abs(float(subsets.mean() - full.mean())) < 4 * standard_error, (float(subsets.mean()), float(full.mean()))
    assert float(subsets.std()) > 0.05  # different subsets differ: the test sees the subset's randomness


def test_ddpm_elbo_refuses_continuous_processes():
    p = VPSDE()
    with pytest.raises(ValueError, match="DiscreteVP"):
        ddpm_elbo(Predictor(MIX.denoiser(p, "eps"), p, "eps"), torch.zeros(2, 2))
