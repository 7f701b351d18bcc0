"""Forward processes and SDEs against their closed forms."""

import math

import pytest
import torch

from ldm.diffusion import (
    PREDICTIONS, VESDE, VPSDE, DiscreteVE, DiscreteVP, FlowMatching, Predictor, SubVPSDE, from_x0_eps, make_betas,
    score_from_eps, to_x0_eps,
)

PROCESSES = {
    "discrete-linear": lambda: DiscreteVP(make_betas("linear", 1000)),
    "discrete-cosine": lambda: DiscreteVP(make_betas("cosine", 1000)),
    "discrete-zsnr": lambda: DiscreteVP(make_betas("linear", 1000, zero_terminal_snr=True)),
    "vp": VPSDE,
    "subvp": SubVPSDE,
    "ve": VESDE,
    "flow": FlowMatching,
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


@pytest.mark.parametrize("target", PREDICTIONS)
@pytest.mark.parametrize("source", PREDICTIONS)
@pytest.mark.parametrize("name", PROCESSES)
def test_parameterisation_round_trips(name, source, target):
    """eps <-> x0 <-> v <-> score: any output converts to any other through (x0, eps), to float precision."""
    p = PROCESSES[name]()
    t = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    alpha, sigma = p.alpha(t), p.sigma(t)
    a, s = alpha[:, None], sigma[:, None]
    x_t = a * x0 + s * eps
    closed = {"eps": eps, "x0": x0, "v": a * eps - s * x0, "score": -eps / s,  # Salimans & Ho 2022, App. D
              "velocity": eps - x0}  # Lipman et al. 2023, Eq. 23; Liu et al. 2023, Eq. 1
    torch.testing.assert_close(from_x0_eps(x0, eps, alpha, sigma, source), closed[source], rtol=1e-12, atol=1e-12)
    x0_back, eps_back = to_x0_eps(closed[source], x_t, alpha, sigma, source)
    torch.testing.assert_close(x0_back, x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eps_back, eps, rtol=1e-10, atol=1e-10)
    converted = from_x0_eps(x0_back, eps_back, alpha, sigma, target)
    torch.testing.assert_close(converted, closed[target], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(score_from_eps(eps_back, sigma), closed["score"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["discrete-linear", "vp", "subvp", "ve", "flow"])
def test_predictor_is_the_same_model_in_every_parameterisation(name):
    """A Predictor built on an eps network or on the equivalent x0 / v / score network gives the same (x0, eps)."""
    p = PROCESSES[name]()

    now = {}  # the exact time of the call (the float32 model time would round it)

    def eps_net(x, m, cond):  # the exact eps of N(0, I) data
        a, s = p.alpha(now["t"]), p.sigma(now["t"])
        return s * x / (a**2 + s**2)

    def net_for(prediction):
        def net(x, m, cond):
            alpha, sigma = p.alpha(now["t"]), p.sigma(now["t"])
            x0, eps = to_x0_eps(eps_net(x, m, cond), x, alpha, sigma, "eps")
            return from_x0_eps(x0, eps, alpha, sigma, prediction)
        return net

    x = torch.randn(5, 3, dtype=torch.float64)
    for t in (0.02, 0.3, 0.9):
        now["t"] = t
        ref = Predictor(eps_net, p, "eps")(x, t)
        for prediction in ("x0", "v", "score", "velocity"):
            got = Predictor(net_for(prediction), p, prediction)(x, t)
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_zero_terminal_snr_rescale():
    betas = make_betas("scaled_linear", 1000, zero_terminal_snr=True)
    ab = torch.cumprod(1 - betas, 0)
    assert float(ab[-1]) == pytest.approx(0.0, abs=1e-12)
    assert float(ab[0]) == pytest.approx(float(1 - make_betas("scaled_linear", 1000)[0]), rel=1e-9)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_chain_is_exact_at_the_knots(schedule):
    """alpha(t_n)^2 = alpha_bar_n at every knot, including alpha(1) = 0 (as DDPMScheduler / DDIMScheduler)."""
    betas = make_betas(schedule, 1000, zero_terminal_snr=True)
    p = DiscreteVP(betas)
    t = (torch.arange(1000, dtype=torch.float64) + 1) / 1000
    torch.testing.assert_close(p.alpha(t) ** 2, torch.cumprod(1 - betas, 0), rtol=1e-12, atol=0)
    assert float(p.alpha(1.0)) == 0.0 and float(p.sigma(1.0)) == 1.0 and float(p.snr(1.0)) == 0.0
    assert float(p.log_snr_half(1.0)) == -math.inf
    a, var = p.transition(1.0, 0.98)  # the last step forgets x_s entirely
    assert float(a) == 0.0 and float(var) == 1.0
    # between knots everything a continuous solver needs stays finite
    inner = torch.linspace(0.001, 0.9999, 5001, dtype=torch.float64)
    for f in (p.alpha, p.sigma, p.f, p.g2, p.log_snr_half):
        assert bool(torch.isfinite(f(inner)).all()), f
    ts = p.timesteps(20, "logsnr")
    assert float(ts[0]) == 1.0 and bool((ts[:-1] > ts[1:]).all()) and bool(torch.isfinite(ts).all())


def test_scalar_and_batched_times_agree():
    """The scalar fast path of the discrete chain is the batched arithmetic, bit for bit."""
    for zsnr in (False, True):
        p = DiscreteVP(make_betas("linear", 1000, zero_terminal_snr=zsnr))
        t = torch.cat([torch.rand(300, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
                       (torch.arange(1000, dtype=torch.float64) + 1) / 1000, torch.tensor([0.0, 1.0])])
        batched = p._log_alpha_bar(t)
        for i in range(len(t)):
            scalar = p._log_alpha_bar(t[i])
            assert float(scalar[0]) == float(batched[0][i]) and float(scalar[1]) == float(batched[1][i])


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_discrete_grids_have_exactly_steps_points(spacing):
    p = DiscreteVP(make_betas("linear", 1000))
    for steps in range(1, 1001):
        ts = p.timesteps(steps, spacing)
        n = p.model_time(ts[:-1]).round()
        assert len(ts) == steps + 1 and float(ts[-1]) == 0.0, steps
        assert bool((n[:-1] > n[1:]).all()) and 0 <= float(n.min()) and float(n.max()) <= 999, steps
        torch.testing.assert_close(n, p.model_time(ts[:-1]), rtol=0, atol=1e-9)  # grid points are knots
        if spacing == "trailing":
            assert float(ts[0]) == 1.0


@pytest.mark.parametrize("name", PROCESSES)
def test_continuous_grids(name):
    p = PROCESSES[name]()
    for spacing in ("uniform", "logsnr", "karras"):
        ts = p.timesteps(30, spacing)
        assert len(ts) == 31 and float(ts[0]) == 1.0 and float(ts[-1]) == 0.0
        assert abs(float(ts[-2]) - p.t_min) < 1e-12 and bool((ts[:-1] > ts[1:]).all())
    lam = p.log_snr_half(p.timesteps(30, "logsnr")[1:-1])
    steps = lam[1:] - lam[:-1]
    torch.testing.assert_close(steps, steps.mean().expand_as(steps), rtol=1e-3, atol=0)  # even in log-SNR


@pytest.mark.parametrize("name", PROCESSES)
def test_prior_and_posterior_variance(name):
    p = PROCESSES[name]()
    x = p.prior_sample((20000, 4), torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = float(p.alpha(1.0) ** 2 + p.sigma(1.0) ** 2) ** 0.5  # the marginal of unit-variance data at t = 1
    assert abs(float(x.std()) / expected - 1) < 0.02
    t, s = 0.7, 0.4
    _, var = p.posterior(torch.zeros(1, 2), torch.zeros(1, 2), t, s)
    torch.testing.assert_close(p.posterior_variance(t, s), var)


@pytest.mark.parametrize("prediction", ["eps", "score"])
def test_eps_prediction_at_zero_snr_is_an_error(prediction):
    p = DiscreteVP(make_betas("linear", 1000, zero_terminal_snr=True))
    model = Predictor(lambda x, m, c: torch.zeros_like(x), p, prediction)
    model(torch.zeros(2, 3), 0.5)  # fine away from t = 1
    with pytest.raises(ValueError, match="zero SNR"):
        model(torch.zeros(2, 3), 1.0)
    x0, eps = Predictor(lambda x, m, c: -torch.ones_like(x), p, "v")(torch.zeros(2, 3), 1.0)
    torch.testing.assert_close(x0, torch.ones(2, 3))  # v at zero SNR: x0 = -v (Lin et al. 2023, Eq. 11)


@pytest.mark.parametrize("name", [*PROCESSES, "ncsn"])
def test_time_from_log_snr_inverts_lambda(name):
    """t(lambda(t)) = t on the whole range (bisection, or closed forms on VE and the flow); EDM's sigma likewise.
    (The discrete chain snaps times within 1e-8 steps of a knot onto it: lambda is flat there, to 1e-11 in t; on a
    zero-terminal-SNR chain lambda is flat at the 2^-24 floor over its last knots, t > 0.997 here.)"""
    p = DiscreteVE(levels=10) if name == "ncsn" else PROCESSES[name]()
    t = torch.cat([torch.linspace(p.t_min, 0.99, 97, dtype=torch.float64),
                   torch.tensor([0.3, 0.7], dtype=torch.float64)])
    torch.testing.assert_close(p.time_from_log_snr_half(p.log_snr_half(t)), t, rtol=0, atol=1e-10)
    torch.testing.assert_close(p.time_from_edm_sigma(p.edm_sigma(t)), t, rtol=0, atol=1e-10)
    torch.testing.assert_close(p.edm_sigma(t), p.sigma(t) / p.alpha(t), rtol=1e-12, atol=0)
    assert float(p.time_from_log_snr_half(torch.tensor(math.inf))) < 1e-15  # beyond the range: the ends
    assert float(p.time_from_log_snr_half(torch.tensor(-math.inf))) == 1.0


@pytest.mark.parametrize("name", PROCESSES)
def test_ode_velocity_is_the_probability_flow_drift(name):
    """alpha' x0 + sigma' eps = f x - g^2 score / 2 at x = alpha x0 + sigma eps (Song et al. 2021, Eq. 13)."""
    p = PROCESSES[name]()
    t = torch.tensor([0.05, 0.4, 0.9], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    x = p.marginal(x0, t, eps)
    drift = p.reverse_drift(x, t, score_from_eps(eps, p.sigma(t)), probability_flow=True)
    torch.testing.assert_close(p.ode_velocity(x0, eps, t), drift, rtol=1e-9, atol=1e-9)
