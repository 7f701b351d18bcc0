"""Forward processes and SDEs against their closed forms."""

import math

import pytest
import torch

from ldm.diffusion import VESDE, VPSDE, DiscreteVP, SubVPSDE, from_x0_eps, make_betas, to_x0_eps

PROCESSES = {
    "discrete-linear": lambda: DiscreteVP(make_betas("linear", 1000)),
    "discrete-cosine": lambda: DiscreteVP(make_betas("cosine", 1000)),
    "vp": VPSDE,
    "subvp": SubVPSDE,
    "ve": VESDE,
}


def test_discrete_knots_are_the_ddpm_chain():
    betas = make_betas("scaled_linear", 1000)
    p = DiscreteVP(betas)
    ab = torch.cumprod(1 - betas, 0)
    t = (torch.arange(1000, dtype=torch.float64) + 1) / 1000
    torch.testing.assert_close(p.alpha(t) ** 2, ab, rtol=1e-12, atol=0)
    torch.testing.assert_close(p.sigma(t) ** 2, 1 - ab, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(p.model_time(t), torch.arange(1000, dtype=torch.float64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", PROCESSES)
def test_drift_and_diffusion_match_finite_differences(name):
    """f = d log alpha/dt and g^2 = d sigma^2/dt - 2 f sigma^2, checked numerically off the knots."""
    p = PROCESSES[name]()
    t = torch.tensor([0.1234, 0.4567, 0.8901], dtype=torch.float64)
    h = 1e-7
    dlog_alpha = (p.alpha(t + h).log() - p.alpha(t - h).log()) / (2 * h)
    dsigma2 = (p.sigma(t + h) ** 2 - p.sigma(t - h) ** 2) / (2 * h)
    torch.testing.assert_close(p.f(t), dlog_alpha, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.g2(t), dsigma2 - 2 * dlog_alpha * p.sigma(t) ** 2, rtol=1e-5, atol=1e-6)


def test_sde_coefficients_closed_forms():
    t = torch.tensor([0.2, 0.7], dtype=torch.float64)
    vp, sub, ve = VPSDE(0.1, 20.0), SubVPSDE(0.1, 20.0), VESDE(0.01, 50.0)
    beta = 0.1 + t * 19.9
    integral = 0.1 * t + 0.5 * 19.9 * t**2
    torch.testing.assert_close(vp.g2(t), beta)  # Song et al. Eq. 11
    torch.testing.assert_close(vp.f(t), -0.5 * beta)
    torch.testing.assert_close(sub.g2(t), beta * (1 - torch.exp(-2 * integral)))  # Eq. 17
    sigma = 0.01 * (50 / 0.01) ** t
    torch.testing.assert_close(ve.g2(t), 2 * sigma**2 * math.log(50 / 0.01))  # d sigma^2 / dt
    torch.testing.assert_close(vp.sigma(t) ** 2, 1 - torch.exp(-integral))
    torch.testing.assert_close(sub.sigma(t), 1 - torch.exp(-integral))


def test_posterior_is_ho_et_al_eq7():
    betas = make_betas("linear", 1000)
    p = DiscreteVP(betas)
    ab = torch.cumprod(1 - betas, 0)
    n = 500
    t, s = (n + 1) / 1000, n / 1000
    x_t, x0 = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    mean, var = p.posterior(x_t, x0, t, s)
    coef0 = ab[n - 1].sqrt() * betas[n] / (1 - ab[n])
    coeft = (1 - betas[n]).sqrt() * (1 - ab[n - 1]) / (1 - ab[n])
    torch.testing.assert_close(mean, coef0 * x0 + coeft * x_t)
    torch.testing.assert_close(var, (1 - ab[n - 1]) / (1 - ab[n]) * betas[n])


@pytest.mark.parametrize("name", PROCESSES)
def test_transitions_compose_with_marginals(name):
    """sigma_t^2 = a^2 sigma_s^2 + sigma_{t|s}^2 for every linear SDE."""
    p = PROCESSES[name]()
    t, s = torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    a, var = p.transition(t, s)
    torch.testing.assert_close(p.sigma(t) ** 2, a**2 * p.sigma(s) ** 2 + var)
    torch.testing.assert_close(a, p.alpha(t) / p.alpha(s))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score"])
@pytest.mark.parametrize("name", ["discrete-linear", "ve"])
def test_parameterisation_round_trips(prediction, name):
    p = PROCESSES[name]()
    t = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    x0, eps = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    alpha, sigma = p.alpha(t), p.sigma(t)
    x_t = alpha[:, None] * x0 + sigma[:, None] * eps
    out = from_x0_eps(x0, eps, alpha, sigma, prediction)
    x0_back, eps_back = to_x0_eps(out, x_t, alpha, sigma, prediction)
    torch.testing.assert_close(x0_back, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_back, eps, rtol=1e-9, atol=1e-9)
    if prediction == "score":
        torch.testing.assert_close(out, -eps / sigma[:, None])


def test_zero_terminal_snr_rescale():
    betas = make_betas("scaled_linear", 1000, zero_terminal_snr=True)
    ab = torch.cumprod(1 - betas, 0)
    assert float(ab[-1]) == pytest.approx(0.0, abs=1e-12)
    assert float(ab[0]) == pytest.approx(float(1 - make_betas("scaled_linear", 1000)[0]), rel=1e-9)
