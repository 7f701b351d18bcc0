"""The closed-form mixture helper is itself exact: its denoiser is the score of the noisy marginal density."""

import math

import pytest
import torch

from ldm.diffusion import VESDE, DiscreteVP, Predictor, SubVPSDE, make_betas
from tests.sampling.mixture import UNCOND, make_mixture

MIX = make_mixture([0.5, 0.3, 0.2], [[-2.0, 0.0, 1.0], [1.5, 1.5, 0.0], [1.0, -2.0, -1.0]], [0.5, 0.3, 0.7])


def log_density(x, alpha, sigma, k=None):
    """log p_t(x) written directly: logsumexp_k log w_k N(x; alpha mu_k, (alpha^2 s_k^2 + sigma^2) I)."""
    v = alpha**2 * MIX.stds**2 + sigma**2  # (K,)
    sq = ((x[:, None, :] - alpha * MIX.means[None]) ** 2).sum(-1)  # (B, K)
    logs = MIX.weights.log() - 0.5 * sq / v - 0.5 * MIX.dim * torch.log(2 * math.pi * v)
    return logs[:, k] - MIX.weights[k].log() if k is not None else logs.logsumexp(1)


@pytest.mark.parametrize("process", [lambda: DiscreteVP(make_betas("linear", 1000)), SubVPSDE, VESDE])
@pytest.mark.parametrize("t", [0.05, 0.4, 0.9])
def test_denoiser_is_the_score_of_the_noisy_marginal(process, t):
    p = process()
    x = 2 * torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    alpha, sigma = float(p.alpha(t)), float(p.sigma(t))
    for k in (None, 0, 2):  # the mixture, and the class-conditional components
        xg = x.clone().requires_grad_(True)
        (score,) = torch.autograd.grad(log_density(xg, alpha, sigma, k).sum(), xg)
        cond = None if k is None else torch.full((64,), k)
        x0, eps = Predictor(MIX.denoiser(p, "eps"), p, "eps")(x, t, cond)
        torch.testing.assert_close(-eps / sigma, score, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(x0, (x + sigma**2 * score) / alpha, rtol=1e-9, atol=1e-9)  # Tweedie
        for prediction in ("x0", "v", "score"):
            got = Predictor(MIX.denoiser(p, prediction), p, prediction)(x, t, cond)
            torch.testing.assert_close(got[0], x0, rtol=1e-9, atol=1e-9)
    labels = torch.full((64,), 1)
    grad = MIX.grad_log_class_prob(p)(x, torch.full((64,), t, dtype=torch.float64), labels)
    xg = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad((log_density(xg, alpha, sigma, 1) + MIX.weights[1].log()
                                       - log_density(xg, alpha, sigma)).sum(), xg)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-9)


def test_labels_mix_conditional_and_unconditional_rows():
    p = VESDE()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.tensor([0, UNCOND, 2, UNCOND, 1, 0])
    m = p.model_time(torch.full((6,), 0.5, dtype=torch.float64)).float()
    both = MIX.denoiser(p, "eps")(x, m, labels)
    torch.testing.assert_close(both[labels == UNCOND], MIX.denoiser(p, "eps")(x, m, None)[labels == UNCOND])
    for k in (0, 1, 2):
        rows = labels == k
        torch.testing.assert_close(both[rows], MIX.denoiser(p, "eps")(x, m, torch.full((6,), k))[rows])


def test_exact_draws_have_the_mixture_moments():
    x, labels = MIX.sample(200_000, torch.Generator().manual_seed(0))
    counts = torch.bincount(labels, minlength=3).double() / len(labels)
    torch.testing.assert_close(counts, MIX.weights, rtol=0, atol=0.005)
    torch.testing.assert_close(x.mean(0), MIX.weights @ MIX.means, rtol=0, atol=0.01)
