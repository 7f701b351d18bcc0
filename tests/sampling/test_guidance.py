"""Guidance through real samplers on a class-conditional Gaussian mixture (cond = class label, null = the mixture).

Classifier-free guidance (Ho & Salimans 2022): scale 0 is the unconditional chain and scale 1 the conditional chain,
sample for sample with the same generator; scale > 1 concentrates samples on the class. Classifier guidance
(Dhariwal & Nichol 2021) with the exact grad log p(y | x_t) at scale 1 is the conditional chain. CFG rescale (Lin et
al. 2023) at phi = 0 is CFG and at phi = 1 has the conditional output's std; a guidance interval (Kynkaenniemi et
al. 2024) covering every sigma is CFG, an empty one the conditional model.
"""

from __future__ import annotations

import pytest
import torch

import math

from ldm.diffusion import VESDE, DiscreteVP, FlowMatching, Predictor, make_betas
from ldm.sampling import ClassifierFreeGuidance, ClassifierGuidance, GuidanceInterval, Guided, sample
from tests.sampling.mixture import UNCOND, make_mixture

# overlapping classes, so that even exact class-0 samples are not all nearest to class 0's mean
MIX = make_mixture([0.4, 0.35, 0.25], [[-1.0, 0.0], [1.0, 0.0], [0.0, 1.5]], [0.7, 0.7, 0.7])
PROCESSES = {"discrete": lambda: DiscreteVP(make_betas("linear", 1000)), "ve": VESDE, "flow": FlowMatching}


def labels(n: int, y: int) -> torch.Tensor:
    return torch.full((n,), y, dtype=torch.long)


def run(model, cond, n=512, sampler="ddpm", steps=25, seed=0, **options):
    return sample(model, (n, 2), sampler=sampler, steps=steps, cond=cond, dtype=torch.float64,
                  generator=torch.Generator().manual_seed(seed), **options)


def nearest_fraction(x: torch.Tensor, y: int) -> float:
    """Fraction of samples whose nearest component mean is class y's."""
    return float((torch.cdist(x, MIX.means).argmin(1) == y).double().mean())


@pytest.mark.parametrize("sampler", ["ddpm", "pc", "dpmpp_2m"])
@pytest.mark.parametrize("process", ["discrete", "ve"])
def test_cfg_scale_0_and_1_are_the_unconditional_and_conditional_chains(process, sampler):
    p = PROCESSES[process]()
    net = MIX.denoiser(p, "v")
    n = 512
    guided = Guided(cond=labels(n, 0), uncond=labels(n, UNCOND))
    for scale, plain_cond in [(0.0, guided.uncond), (1.0, guided.cond)]:
        cfg = run(Predictor(ClassifierFreeGuidance(net, scale), p, "v"), guided, sampler=sampler)
        plain = run(Predictor(net, p, "v"), plain_cond, sampler=sampler)
        torch.testing.assert_close(cfg, plain, rtol=0, atol=0)


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_cfg_batched_forward_is_the_guided_combination(scale):
    """The one-forward batched path equals uncond + scale (cond - uncond) evaluated separately, through a sampler."""
    p = PROCESSES["discrete"]()
    net, n = MIX.denoiser(p, "eps"), 512
    guided = Guided(cond=labels(n, 1), uncond=labels(n, UNCOND))
    batch_sizes = []

    def counting(x, m, c):
        batch_sizes.append(x.shape[0])
        return net(x, m, c)

    def by_hand(x, m, c):
        u, k = net(x, m, c.uncond), net(x, m, c.cond)
        return u + scale * (k - u)

    cfg = run(Predictor(ClassifierFreeGuidance(counting, scale), p, "eps"), guided, sampler="ddim", steps=10)
    assert set(batch_sizes) == {2 * n}  # both halves in one forward, every step
    ref = run(Predictor(by_hand, p, "eps"), guided, sampler="ddim", steps=10)
    torch.testing.assert_close(cfg, ref, rtol=1e-12, atol=1e-12)


def test_cfg_scale_above_1_concentrates_on_the_class():
    p = PROCESSES["discrete"]()
    net, n, y = MIX.denoiser(p, "v"), 10_000, 0
    guided = Guided(cond=labels(n, y), uncond=labels(n, UNCOND))
    fraction = {s: nearest_fraction(run(Predictor(ClassifierFreeGuidance(net, s), p, "v"), guided, n=n,
                                        sampler="dpmpp_2m", steps=25), y) for s in (1.0, 2.0, 4.0)}
    exact = nearest_fraction(MIX.sample(n, torch.Generator().manual_seed(9), labels(n, y))[0], y)
    se = (exact * (1 - exact) / n) ** 0.5
    assert exact < 0.9  # the classes overlap: there is room to concentrate
    assert abs(fraction[1.0] - exact) < 4 * se * 2**0.5, (fraction, exact)  # scale 1 is the class distribution
    assert fraction[1.0] + 0.05 < fraction[2.0] <= fraction[4.0], fraction


@pytest.mark.parametrize("sampler", ["ddpm", "euler_maruyama", "heun_ode"])
@pytest.mark.parametrize("process", ["discrete", "ve"])
def test_classifier_guidance_with_the_exact_classifier_is_the_conditional_chain(process, sampler):
    """eps(x) - sigma grad log p(y | x_t) = eps(x | y): Bayes' rule, exact for the mixture's closed-form classifier."""
    p = PROCESSES[process]()
    net, n = MIX.denoiser(p, "eps"), 512
    unconditional = Predictor(lambda x, m, c: net(x, m, None), p, "eps")  # ignores the label
    guided = ClassifierGuidance(unconditional, MIX.grad_log_class_prob(p), scale=1.0)
    for y in (0, 2):
        ours = run(guided, labels(n, y), sampler=sampler)
        conditional = run(Predictor(net, p, "eps"), labels(n, y), sampler=sampler)
        torch.testing.assert_close(ours, conditional, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(run(ClassifierGuidance(unconditional, MIX.grad_log_class_prob(p), 0.0), labels(n, 0)),
                               run(unconditional, None), rtol=0, atol=0)


def _guided_run(p, denoiser, n=512, sampler="unipc", steps=12, y=0):
    guided = Guided(cond=labels(n, y), uncond=labels(n, UNCOND))
    return run(Predictor(denoiser, p, "v"), guided, n=n, sampler=sampler, steps=steps)


@pytest.mark.parametrize("process", PROCESSES)
def test_cfg_rescale_phi_0_is_cfg_and_phi_1_keeps_the_conditional_std(process):
    p = PROCESSES[process]()
    net, scale = MIX.denoiser(p, "v"), 3.0

    def by_hand(x, m, c):  # uncond + scale (cond - uncond), evaluated separately
        u, k = net(x, m, c.uncond), net(x, m, c.cond)
        return u + scale * (k - u)

    plain = _guided_run(p, by_hand)
    torch.testing.assert_close(_guided_run(p, ClassifierFreeGuidance(net, scale, rescale=0.0)), plain,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_guided_run(p, ClassifierFreeGuidance(net, scale, rescale=1e-9)), plain,
                               rtol=0, atol=1e-7)  # continuous in phi
    assert float((_guided_run(p, ClassifierFreeGuidance(net, scale, rescale=0.7)) - plain).abs().max()) > 1e-2
    # phi = 1: the guided output rescaled to the conditional output's per-sample std, direction unchanged
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    m = p.model_time(torch.full((64,), 0.5, dtype=torch.float64))
    c = Guided(cond=labels(64, 1), uncond=labels(64, UNCOND))
    out, cfg, cond = ClassifierFreeGuidance(net, scale, rescale=1.0)(x, m, c), by_hand(x, m, c), net(x, m, c.cond)
    torch.testing.assert_close(out.std(1), cond.std(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(out / out.std(1, keepdim=True), cfg / cfg.std(1, keepdim=True), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("phi", [0.3, 0.7])
def test_cfg_rescale_matches_diffusers(phi):
    pytest.importorskip("diffusers")
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    g = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g) * 1.3
    outputs = iter([torch.cat([uncond, cond])])
    cfg = ClassifierFreeGuidance(lambda x, t, c: next(outputs), 5.0, rescale=phi)
    ours = cfg(torch.zeros(4, 4, 8, 8), torch.zeros(4), Guided(torch.zeros(4, 1), torch.zeros(4, 1)))
    theirs = rescale_noise_cfg(uncond + 5.0 * (cond - uncond), cond, guidance_rescale=phi)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampler", ["unipc", "edm_heun", "ddpm"])
@pytest.mark.parametrize("process", PROCESSES)
def test_guidance_interval_limits(process, sampler):
    """An interval covering every sigma is CFG, an empty one the conditional model, bit for bit through a sampler."""
    p = PROCESSES[process]()
    net = MIX.denoiser(p, "v")
    cfg = ClassifierFreeGuidance(net, 3.0)
    everywhere = GuidanceInterval(cfg, p, 0.0, math.inf)
    nowhere = GuidanceInterval(cfg, p, 2.0, 2.0)
    torch.testing.assert_close(_guided_run(p, everywhere, sampler=sampler), _guided_run(p, cfg, sampler=sampler),
                               rtol=0, atol=0)
    conditional = run(Predictor(net, p, "v"), labels(512, 0), sampler=sampler, steps=12)
    torch.testing.assert_close(_guided_run(p, nowhere, sampler=sampler), conditional, rtol=0, atol=0)


def test_guidance_interval_guides_exactly_inside_per_sample():
    """Within one batch at different times: guided where sigma_lo < sigma_edm <= sigma_hi, conditional elsewhere."""
    p = PROCESSES["discrete"]()
    net = MIX.denoiser(p, "v")
    cfg = ClassifierFreeGuidance(net, 4.0)
    lo, hi = 0.3, 2.0
    t = torch.linspace(0.05, 0.95, 64, dtype=torch.float64)
    sigma = p.edm_sigma(t)
    inside = (sigma > lo) & (sigma <= hi)
    assert 0 < int(inside.sum()) < 64
    x, m = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64), p.model_time(t)
    c = Guided(cond=labels(64, 2), uncond=labels(64, UNCOND))
    out = GuidanceInterval(cfg, p, lo, hi)(x, m, c)
    torch.testing.assert_close(out[inside], cfg(x, m, c)[inside], rtol=0, atol=0)
    torch.testing.assert_close(out[~inside], net(x, m, c.cond)[~inside], rtol=0, atol=0)
