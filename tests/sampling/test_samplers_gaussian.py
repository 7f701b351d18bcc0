"""Gaussian data, where the probability-flow ODE has a closed-form solution; sampler plumbing and CFG wrapper.

The distribution checks of every sampler live in test_samplers_mixture.py (a Gaussian is a one-component mixture).
"""

import pytest
import torch

from ldm.diffusion import VPSDE, DiscreteVP, FlowMatching, Predictor, make_betas
from ldm.sampling import SAMPLERS, ClassifierFreeGuidance, Guided, sample

MU, S = 1.5, 0.5  # data x0 ~ N(MU, S^2 I)


def exact_eps_denoiser(process):
    """E[eps | x_t] for Gaussian data: sigma (x_t - alpha mu) / (alpha^2 s^2 + sigma^2)."""

    def denoiser(x, m, cond):
        t = process.time_from_model(m.double())
        a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
        return (s * (x.double() - a * MU) / (a**2 * S**2 + s**2)).to(x.dtype)

    return denoiser


def exact_velocity_denoiser(process):
    """E[eps - x0 | x_t] for Gaussian data, finite at alpha = 0: x0 = mu + alpha s^2 (x - alpha mu) / v."""

    def denoiser(x, m, cond):
        t = process.time_from_model(m.double())
        a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
        v = a**2 * S**2 + s**2
        centred = x.double() - a * MU
        return (s * centred / v - (MU + a * S**2 * centred / v)).to(x.dtype)

    return denoiser


# process -> solver -> max error allowed at 80 steps, each on its default grid (measured: VP 7e-4, 1.4e-3, 2e-4,
# 5e-4, 5e-3, 1.8e-2; flow 1.5e-4, 9e-3, 1.3e-3, 3e-4, 1e-3, 3.8e-2: the log-SNR solvers' first step from lambda = -inf
# on the flow's uniform grid costs them accuracy, the 1st-order Euler in t is far less accurate everywhere)
ODE_TOLERANCE = {
    "vp": {"heun_ode": 2e-3, "dpmpp_2m": 2e-3, "dpmpp_3m": 2e-3, "unipc": 2e-3, "edm_heun": 1e-2, "euler_ode": 5e-2},
    "flow": {"heun_ode": 1e-3, "dpmpp_2m": 2e-2, "dpmpp_3m": 5e-3, "unipc": 1e-3, "edm_heun": 5e-3, "euler_ode": 5e-2},
}


@pytest.mark.parametrize("name", ["vp", "flow"])
def test_ode_solver_error_shrinks_with_steps(name):
    p = VPSDE() if name == "vp" else FlowMatching()
    model = (Predictor(exact_eps_denoiser(p), p, "eps") if name == "vp" else
             Predictor(exact_velocity_denoiser(p), p, "velocity"))
    x_T = p.prior_sample((2000, 2), torch.Generator().manual_seed(0))
    # for Gaussian data the probability-flow ODE keeps (x_t - alpha mu) / sqrt(alpha^2 s^2 + sigma^2) fixed
    a1, s1 = float(p.alpha(1.0)), float(p.sigma(1.0))
    exact = MU + S * (x_T - a1 * MU) / (a1**2 * S**2 + s1**2) ** 0.5
    for solver, tolerance in ODE_TOLERANCE[name].items():
        errs = [float((sample(model, x_T.shape, sampler=solver, steps=n, x_T=x_T) - exact).abs().max())
                for n in (5, 20, 80)]
        assert errs[0] > errs[1] > errs[2] and errs[2] < tolerance, (solver, errs)


def test_classifier_free_guidance_limits_and_one_batched_forward():
    calls = []

    def denoiser(x, t, cond):
        calls.append(x.shape[0])
        return x * cond  # cond is a (B, 1) tensor: the "condition"

    cond, uncond = torch.full((3, 1), 2.0), torch.full((3, 1), 0.5)
    x, t = torch.randn(3, 4), torch.zeros(3)
    g = Guided(cond, uncond)
    torch.testing.assert_close(ClassifierFreeGuidance(denoiser, 0.0)(x, t, g), x * 0.5, rtol=0, atol=0)
    torch.testing.assert_close(ClassifierFreeGuidance(denoiser, 1.0)(x, t, g), x * 2.0, rtol=0, atol=0)
    calls.clear()
    out = ClassifierFreeGuidance(denoiser, 3.0)(x, t, g)
    assert calls == [6]  # one forward over both halves
    torch.testing.assert_close(out, x * 0.5 + 3.0 * (x * 2.0 - x * 0.5))


# pc's Langevin step size uses norms averaged over the batch (Song et al.'s reference code): batch-dependent by design
@pytest.mark.parametrize("sampler", sorted(set(SAMPLERS) - {"pc"}))
def test_per_image_generators_make_images_independent_of_batch(sampler):
    p = DiscreteVP(make_betas("linear", 1000))
    model = Predictor(exact_eps_denoiser(p), p, "eps")
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    options = {"s_churn": 20.0} if sampler == "edm_heun" else {}  # with its noise
    both = sample(model, (2, 3), sampler=sampler, steps=20, generator=gens([7, 8]), **options)
    alone = sample(model, (1, 3), sampler=sampler, steps=20, generator=gens([8]), **options)
    torch.testing.assert_close(both[1:], alone, rtol=1e-6, atol=1e-6)
