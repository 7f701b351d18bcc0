"""Score-matching objectives for a network that outputs the score s_theta(x_t, t) ~ grad log p_t(x_t) directly.

Both objectives run over the noise levels of a process, x_t = alpha x0 + sigma eps with t drawn by
``process.sample_time`` (one of L levels on ``DiscreteVE``, t ~ U[t_min, 1] on continuous processes), and weight
level t by lambda(t) = sigma(t)^2, which makes lambda E||grad log q(x_t | x0)||^2 the same at every level
(Song & Ermon 2019, Eq. 6 and Sec. 4.2; the continuous form is Song et al. 2021, Eq. 7). Losses are divided by
the dimension D, as ``diffusion_loss`` averages over dimensions.

* Denoising score matching (Vincent 2011; NCSN, Song & Ermon 2019, Eq. 5): the target is the score of the
  perturbation kernel, grad log q(x_t | x0) = -eps / sigma, so
  lambda 1/2 ||s_theta + eps / sigma||^2 = 1/2 ||sigma s_theta + eps||^2.
  Its expectation is 1/2 E[sigma^2 ||s_theta - grad log p_t||^2] + const (Vincent 2011, Eq. 11).
* Sliced score matching with variance reduction (Song, Garg, Shi & Ermon 2019): on samples of p_t,
  E_v[v^T (d s_theta / dx) v] + 1/2 ||s_theta||^2 with v ~ N(0, I), Hutchinson's (1989) estimate of the Jacobian
  trace in Hyvarinen's (2005) score matching. Its expectation is
  1/2 E[sigma^2 ||s_theta - grad log p_t||^2] - 1/2 E[sigma^2 ||grad log p_t||^2], so it can be negative.
  It needs a double backward (the projection's gradient, differentiated again in the weights), so the network runs
  with PyTorch's math attention kernel: the fused attention kernels have no second derivative.

All randomness comes from ``generator`` (one torch.Generator, or one per sample) through ``sample_time``/``randn``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldm.diffusion.parameterization import Denoiser, time_dtype
from ldm.diffusion.sde import GaussianProcess, bcast, randn

Tensor = torch.Tensor


def perturb(x0: Tensor, process: GaussianProcess, generator=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(t (B,), sigma (B,), eps, x_t): a training time per sample and x_t ~ q(x_t | x0) (Ho et al. 2020, Eq. 4)."""
    t = process.sample_time(x0.shape[0], generator, device="cpu")  # (B,) float64
    eps = randn(tuple(x0.shape), generator, x0.device, x0.dtype)  # (B, ...)
    return t, process.sigma(t), eps, process.marginal(x0, t, eps)


def _score(denoiser: Denoiser, x_t: Tensor, t: Tensor, cond: Any, process: GaussianProcess) -> Tensor:
    """The network's output, the score s_theta(x_t, t), in at least float32."""
    out = denoiser(x_t, process.model_time(t).to(device=x_t.device, dtype=time_dtype(x_t)), cond)
    return out.to(torch.promote_types(out.dtype, torch.float32))


def dsm_loss(denoiser: Denoiser, x0: Tensor, cond: Any, process: GaussianProcess, *,
             generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
    """sigma^2-weighted denoising score matching, 1/2 E||sigma s_theta(x_t, t) + eps||^2 / D (NCSN Eq. 5-6)."""
    t, sigma, eps, x_t = perturb(x0, process, generator)
    score = _score(denoiser, x_t, t, cond, process)  # (B, ...)
    residual = bcast(sigma, score) * score + eps.to(score.dtype)  # sigma (s_theta - grad log q(x_t | x0))
    return 0.5 * residual.pow(2).flatten(1).mean(1).mean()


def ssm_loss(denoiser: Denoiser, x0: Tensor, cond: Any, process: GaussianProcess, *, projections: int = 1,
             generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
    """sigma^2-weighted sliced score matching with variance reduction (Song et al. 2019), divided by D.

    Per sample: sigma^2 (mean over ``projections`` v ~ N(0, I) of v^T (ds/dx) v, plus 1/2 ||s||^2). The inputs
    x_t = alpha x0 + sigma eps are draws of p_t; only the network's derivative in x_t enters, never eps.
    """
    if projections < 1:
        raise ValueError(f"projections must be >= 1, got {projections}")
    t, sigma, _, x_t = perturb(x0, process, generator)
    x_t = x_t.detach()
    trace, score = torch.zeros(x0.shape[0], device=x0.device), None  # (B,)
    for _ in range(projections):
        v = randn(tuple(x0.shape), generator, x0.device, x0.dtype)  # (B, ...)

        def projected(x: Tensor) -> tuple[Tensor, Tensor]:
            s = _score(denoiser, x, t, cond, process)  # (B, ...)
            return (s * v.to(s.dtype)).sum(), s

        # grad_x (v^T s) = v^T ds/dx, differentiable in the weights. Inside torch.func's transform so that training
        # wrappers hooking the network's outputs (DeepSpeed's engine scales and counts every backward through
        # them) leave this inner gradient alone; the math attention kernel is the one with a second derivative.
        with sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
            vjp, (_, s) = torch.func.grad_and_value(projected, has_aux=True)(x_t)  # (B, ...), (B, ...)
        trace = trace.to(s.dtype) + (vjp * v.to(s.dtype)).flatten(1).sum(1) / projections  # v^T (ds/dx) v  (B,)
        score = s if score is None else score
    per_sample = (trace + 0.5 * score.pow(2).flatten(1).sum(1)) / x0[0].numel()  # (B,)
    return (sigma.to(per_sample) ** 2 * per_sample).mean()
