"""Training-time distributions (Esser et al. 2024, Sec. 3.1; Karras et al. 2022, Table 1) and SD3's shift."""

import math

import pytest
import torch
from scipy import stats

from ldm.diffusion import (
    VESDE, VPSDE, DiscreteVE, DiscreteVP, FlowMatching, TimeSampling, diffusion_loss, make_betas, shift_time,
)

PROCESSES = {"discrete": lambda: DiscreteVP(make_betas("linear", 1000)), "vp": VPSDE, "ve": lambda: VESDE(0.002, 80.0),
             "flow": FlowMatching, "ncsn": lambda: DiscreteVE(levels=10)}
N = 20_000


def draw(kind, process="flow", n=N, seed=0, **options):
    return TimeSampling(kind, **options)(PROCESSES[process](), n, torch.Generator().manual_seed(seed))


def ks(sample: torch.Tensor, cdf) -> float:
    return stats.kstest(sample.numpy(), cdf).pvalue


def test_logit_normal_is_eq_19():
    t = draw("logit_normal", mean=0.5, std=0.8)
    logit = (t / (1 - t)).log()
    assert ks(logit, stats.norm(0.5, 0.8).cdf) > 1e-3
    assert ks(logit, stats.norm(0.5, 0.9).cdf) < 1e-6  # the test sees a 12% error in s
    assert ks((lambda t: (t / (1 - t)).log())(draw("logit_normal")), stats.norm(0, 1).cdf) > 1e-3  # SD3's default


def test_mode_and_cosmap_are_eq_20_and_21():
    s = 1.29
    t = draw("mode", mode_scale=s)
    u = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
    f_mode = 1 - u - s * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)  # decreasing: P(t <= f(u)) = 1 - u
    empirical = (t[None, :] <= f_mode[:, None]).double().mean(1)
    assert float((empirical - (1 - u)).abs().max()) < 0.015
    assert ks(draw("mode", mode_scale=0.0), stats.uniform(0, 1).cdf) > 1e-3  # s = 0 is uniform
    # heavy tails and a mode in the middle for s > 0: more mass in the centre than uniform, and at the ends too
    middle, ends = ((t - 0.5).abs() < 0.1).double().mean(), ((t < 0.02) | (t > 0.98)).double().mean()
    assert float(middle) > 0.25 and float(ends) > 0.005
    # cosmap: t = 1 - 1 / (tan(pi u / 2) + 1) has CDF (2 / pi) atan(x / (1 - x))
    assert ks(draw("cosmap"), lambda x: 2 / math.pi * torch.atan(torch.as_tensor(x / (1 - x))).numpy()) > 1e-3


@pytest.mark.parametrize("name", PROCESSES)
def test_edm_lognormal_is_the_same_noise_levels_on_every_process(name):
    """ln sigma_edm(t) = P_mean + P_std z for the generator's z, wherever the level lies in the process's range
    (elsewhere t is clamped to [t_min, 1])."""
    p = PROCESSES[name]()
    t = draw("edm", name, seed=5)
    z = torch.randn(N, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    inside = (t > p.t_min) & (t < 1)
    assert float(inside.double().mean()) > (0.9 if name == "ncsn" else 0.99)
    torch.testing.assert_close(p.edm_sigma(t[inside]).log(), -1.2 + 1.2 * z[inside], rtol=0, atol=1e-8)
    bounds = p.edm_sigma(torch.tensor([p.t_min, 1.0], dtype=torch.float64)).log()
    assert bool((-1.2 + 1.2 * z[t == p.t_min] <= bounds[0] + 1e-9).all())
    assert bool((-1.2 + 1.2 * z[t == 1] >= bounds[1] - 1e-9).all())


@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "mode", "cosmap", "edm"])
def test_shift_is_applied_after_the_draw_and_generators_are_per_sample(kind):
    for name in ("vp", "flow"):
        p = PROCESSES[name]()
        torch.testing.assert_close(draw(kind, name, seed=1, shift=3.0),
                                   shift_time(draw(kind, name, seed=1), 3.0).clamp(p.t_min, 1), rtol=0, atol=0)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    both = TimeSampling(kind)(PROCESSES["vp"](), 2, gens([7, 8]))
    alone = TimeSampling(kind)(PROCESSES["vp"](), 1, gens([8]))
    assert float(both[1]) == float(alone[0])


def test_uniform_is_the_process_sampler_and_the_loss_uses_the_draw():
    for name in PROCESSES:
        p = PROCESSES[name]()
        torch.testing.assert_close(draw("uniform", name, n=64, seed=3),
                                   p.sample_time(64, torch.Generator().manual_seed(3)), rtol=0, atol=0)
    p, seen = FlowMatching(), {}

    def net(x, m, cond):
        seen["m"] = m.double()
        return torch.zeros_like(x)

    x0 = torch.randn(256, 3, dtype=torch.float64)
    sampling = TimeSampling("logit_normal", shift=3.0)
    diffusion_loss(net, x0, None, p, prediction="velocity", time_sampling=sampling,
                   generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(p.time_from_model(seen["m"]), sampling(p, 256, torch.Generator().manual_seed(2)),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("options", [dict(kind="sigmoid"), dict(kind="mode", mean=0.0), dict(kind="edm", std=0.0),
                                     dict(kind="mode", mode_scale=2.0), dict(kind="uniform", shift=0.0)])
def test_invalid_time_samplings_are_refused(options):
    with pytest.raises(ValueError):
        TimeSampling(**options)
