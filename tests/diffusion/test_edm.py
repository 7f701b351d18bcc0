"""EDM (Karras et al. 2022): preconditioning, its loss weighting and time distribution, the Karras rho-grid."""

import math

import pytest
import torch

from ldm.diffusion import (
    VESDE, VPSDE, DiscreteVP, EDMPrecond, FlowMatching, Predictor, SubVPSDE, TimeSampling, diffusion_loss,
    edm_coefficients, karras_sigmas, loss_weight, make_betas,
)
from ldm.sampling import sample
from tests.sampling.mixture import make_mixture

MIX = make_mixture([0.6, 0.4], [[-1.0, 0.5], [1.2, -0.3]], [0.3, 0.5])
PROCESSES = {"ve-edm": lambda: VESDE(0.002, 80.0), "vp": VPSDE, "subvp": SubVPSDE,
             "discrete": lambda: DiscreteVP(make_betas("linear", 1000))}
SIGMA_DATA = 0.5


def test_coefficients_are_table_1_and_give_unit_variance():
    """c_in x and the target (x0 - c_skip x) / c_out have unit variance for data of std sigma_data (App. B.6);
    lambda(sigma) = 1 / c_out^2 (Eq. 8)."""
    sigma = torch.logspace(-3, 2, 50, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, SIGMA_DATA)
    torch.testing.assert_close(c_noise, sigma.log() / 4, rtol=0, atol=0)
    var_in = c_in**2 * (SIGMA_DATA**2 + sigma**2)  # x = x0 + sigma n, x0 ~ N(0, sigma_data^2)
    var_target = ((1 - c_skip) ** 2 * SIGMA_DATA**2 + c_skip**2 * sigma**2) / c_out**2
    torch.testing.assert_close(var_in, torch.ones_like(sigma), rtol=1e-12, atol=0)
    torch.testing.assert_close(var_target, torch.ones_like(sigma), rtol=1e-12, atol=0)
    # c_skip minimises the target's variance: d/dc of ((1 - c)^2 sd^2 + c^2 sigma^2) = 0 (their App. B.6)
    torch.testing.assert_close(c_skip, SIGMA_DATA**2 / (SIGMA_DATA**2 + sigma**2), rtol=1e-12, atol=0)
    snr = sigma**-2
    torch.testing.assert_close(loss_weight(snr, "x0", "edm", sigma_data=SIGMA_DATA), 1 / c_out**2, rtol=1e-12, atol=0)


def _ideal_network(sigma_data=SIGMA_DATA):
    """F* from the raw inputs only: sigma = exp(4 c_noise), x = y / c_in, D* the mixture's exact denoiser in EDM's
    frame (alpha = 1, sigma), F* = (D* - c_skip x) / c_out, the network EDM's loss is minimised by (Eq. 8)."""

    def net(y, c_noise, cond):
        sigma = (4 * c_noise.double()).exp()  # (B,)
        c_skip, c_out, c_in, _ = edm_coefficients(sigma, sigma_data)
        x = y.double() / c_in[:, None]
        d, _ = MIX.posterior(x, torch.ones_like(sigma), sigma)
        return ((d - c_skip[:, None] * x) / c_out[:, None]).to(y.dtype)

    return net


@pytest.mark.parametrize("name", PROCESSES)
def test_preconditioning_of_the_exact_denoiser_is_the_exact_denoiser(name):
    p = PROCESSES[name]()
    wrapped = Predictor(EDMPrecond(_ideal_network(), p, SIGMA_DATA), p, "x0")
    exact = Predictor(MIX.denoiser(p, "x0"), p, "x0")
    g = torch.Generator().manual_seed(0)
    for t in (p.t_min, 0.1, 0.5, 0.97):
        x = p.marginal(MIX.sample(256, g)[0], torch.tensor(t, dtype=torch.float64),
                       torch.randn(256, 2, generator=g, dtype=torch.float64))
        for got, want in zip(wrapped(x, t), exact(x, t)):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    run = lambda model: sample(model, (512, 2), sampler="edm_heun", steps=12, dtype=torch.float64,  # noqa: E731
                               generator=torch.Generator().manual_seed(1), s_churn=5.0)
    torch.testing.assert_close(run(wrapped), run(exact), rtol=1e-8, atol=1e-8)


def test_edm_loss_is_the_unit_weighted_network_error():
    """diffusion_loss of the preconditioned network with weighting 'edm' = E ||F(c_in x, c_noise) - F_target||^2
    (Eq. 8: lambda c_out^2 = 1), with ln sigma ~ N(-1.2, 1.2^2) from time sampling 'edm'."""
    p = VESDE(0.002, 80.0)
    seen = {}

    def net(y, c_noise, cond):
        out = 0.4 * y + 0.2 * torch.sin(3 * y) + c_noise[:, None, None, None]
        seen.update(y=y.clone(), c_noise=c_noise.clone(), out=out.clone())
        return out

    x0 = torch.randn(512, 2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * SIGMA_DATA
    loss = diffusion_loss(EDMPrecond(net, p, SIGMA_DATA), x0, None, p, prediction="x0", weighting="edm",
                          time_sampling=TimeSampling("edm"), sigma_data=SIGMA_DATA,
                          generator=torch.Generator().manual_seed(4))
    sigma = (4 * seen["c_noise"]).exp()
    c_skip, c_out, c_in, _ = edm_coefficients(sigma, SIGMA_DATA)
    b = lambda c: c[:, None, None, None]  # noqa: E731
    x = seen["y"] / b(c_in)
    target = (x0 - b(c_skip) * x) / b(c_out)
    expected = (seen["out"] - target).pow(2).flatten(1).mean(1).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)
    z = (sigma.log() + 1.2) / 1.2  # the sampled levels are EDM's log-normal (inside VE's [0.002, 80])
    assert abs(float(z.mean())) < 0.15 and abs(float(z.std()) - 1) < 0.1


def test_preconditioning_refuses_zero_snr():
    p = FlowMatching()
    wrapped = Predictor(EDMPrecond(lambda y, c, cond: y, p), p, "x0")
    wrapped(torch.zeros(2, 2), 0.5)
    with pytest.raises(ValueError, match="alpha > 0"):
        wrapped(torch.zeros(2, 2), 1.0)


def test_karras_sigmas_are_eq_5():
    for n, lo, hi, rho in [(10, 0.002, 80.0, 7.0), (3, 0.1, 10.0, 3.0), (25, 0.0292, 14.6146, 7.0)]:
        got = karras_sigmas(n, lo, hi, rho)
        want = torch.tensor([(hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
                             for i in range(n)], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
        assert math.isclose(float(got[0]), hi, rel_tol=1e-14) and math.isclose(float(got[-1]), lo, rel_tol=1e-14)
    assert len(karras_sigmas(1, 0.1, 10.0)) == 1 and math.isclose(float(karras_sigmas(1, 0.1, 10.0)[0]), 10.0)


@pytest.mark.parametrize("name", PROCESSES)
def test_karras_spacing_endpoints_and_rho(name):
    p = PROCESSES[name]()
    ts = p.timesteps(18, "karras")
    assert len(ts) == 19 and float(ts[0]) == 1.0 and float(ts[-2]) == p.t_min and float(ts[-1]) == 0.0
    sigma = p.edm_sigma(ts[:-1])
    torch.testing.assert_close(sigma[[0, -1]], p.edm_sigma(torch.tensor([1.0, p.t_min], dtype=torch.float64)))
    root = sigma ** (1 / 7)  # rho = 7: sigma^(1/rho) is linear in the step index
    torch.testing.assert_close(root[1:] - root[:-1], (root[1] - root[0]).expand(17), rtol=1e-8, atol=0)


def test_karras_spacing_on_the_chain_is_diffusers_karras_sigmas():
    diffusers = pytest.importorskip("diffusers")
    p = DiscreteVP(make_betas("scaled_linear", 1000))
    scheduler = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                                 beta_start=0.00085, beta_end=0.012, use_karras_sigmas=True)
    scheduler.set_timesteps(20)
    torch.testing.assert_close(p.edm_sigma(p.timesteps(20, "karras")[:-1]).float(), scheduler.sigmas[:-1],
                               rtol=2e-5, atol=0)
