"""Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) fed the exact score of a Gaussian mixture.

The distance test is the one every other sampler passes (tests/sampling/test_samplers_mixture.py): sliced W1 of
10,000 samples to the mixture, bound 3x the mean of the noise floor of exact draws. Langevin steps are biased for a
finite step size and annealing needs enough levels, so the test also shows the error falling as levels grow, and
checks one level's update rule against the closed-form stationary law of the unadjusted Langevin algorithm.
"""

from __future__ import annotations

import functools
import math

import torch

from ldm.diffusion import VESDE, DiscreteVE, Predictor
from ldm.sampling import SAMPLERS, sample
from ldm.sampling.samplers import DEFAULT_SPACING
from tests.sampling.mixture import make_mixture
from tests.sampling.test_samplers_mixture import MIXTURES, N, SEED, bound, statistic

@functools.lru_cache(maxsize=None)
def run(levels: int, steps_per_level: int = 5) -> float:
    """Distance to the 2-D mixture of N annealed-Langevin samples over NCSN's L = ``levels`` geometric levels
    (float64), started from the exact marginal at the largest level."""
    p, data = DiscreteVE(levels=levels), MIXTURES["2d"]
    model = Predictor(data.denoiser(p, "eps"), p, "eps")
    gen = torch.Generator().manual_seed(SEED)
    x_T = data.sample_noisy(N, float(p.alpha(1.0)), float(p.sigma(1.0)), gen)
    x = sample(model, x_T.shape, sampler="annealed_langevin", steps=levels, generator=gen, x_T=x_T,
               steps_per_level=steps_per_level, step_size=0.5)
    return statistic("2d")(x)


def test_registered():
    assert "annealed_langevin" in SAMPLERS and DEFAULT_SPACING["annealed_langevin"] == "trailing"


def test_reproduces_mixture_on_ncsn_levels(one_thread):
    """NCSN's own 200 geometric levels, sigma 50 -> 0.01 (the uniform grid with steps = L visits exactly them)."""
    p = DiscreteVE(levels=200)
    torch.testing.assert_close(p.sigma(p.timesteps(200)[:-1]), p.noise_levels(), rtol=1e-12, atol=0)
    d = run(200)
    assert d <= bound("2d"), f"distance {d:.4g} = {d / bound('2d'):.2f} x the bound"


def test_error_shrinks_with_levels(one_thread):
    errors = [run(levels) for levels in (25, 50, 200)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[0] > bound("2d"), "25 levels should be visibly too few: otherwise the test cannot see the error"


def test_one_level_is_unadjusted_langevin(one_thread):
    """At one level of N(0, s^2 I) data (VE: p_t = N(0, v I), v = s^2 + sigma^2), x <- x + a/2 score + sqrt(a) z is
    the unadjusted Langevin algorithm, whose stationary law is N(0, v / (1 - a / (4 v))) for a = step_size sigma^2;
    the returned Tweedie estimate (s^2 / v) x then has variance (s^2 / v)^2 v / (1 - a / (4 v))."""
    s, sigma, step = 0.5, 1.0, 1.0
    p = VESDE(sigma_min=0.01, sigma_max=100.0)
    t = float(p.time_from_model(torch.tensor(math.log(sigma))))
    data = make_mixture([1.0], [[0.0, 0.0]], [s])
    model = Predictor(data.denoiser(p, "score"), p, "score")
    v, a = s**2 + sigma**2, step * sigma**2
    n = 20_000
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=gen, dtype=torch.float64) * math.sqrt(v)  # the exact p_t: ULA moves away from it
    out = SAMPLERS["annealed_langevin"](model, x, torch.tensor([t, 0.0], dtype=torch.float64), generator=gen,
                                        steps_per_level=60, step_size=step)
    expected = (s**2 / v) ** 2 * v / (1 - a / (4 * v))
    var = out.var(0)  # (2,)
    standard_error = expected * math.sqrt(2 / (n - 1))
    assert (var - expected).abs().max() < 4 * standard_error, (var, expected)
    exact = (s**2 / v) ** 2 * v  # what an exact sampler of p_t would give: 25% lower, far outside the error
    assert (var - exact).abs().min() > 10 * standard_error
