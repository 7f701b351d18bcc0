"""The training objectives, one registry like the samplers': name -> loss(denoiser, x0, cond, process, ...).

* ``denoising``: the simplified DDPM objective E||target - net(x_t, t)||^2 on an eps / x0 / v / score target with
  uniform or min-SNR weights (``parameterization.diffusion_loss``; Ho et al. 2020, Eq. 14).
* ``dsm``: sigma^2-weighted denoising score matching (``score_matching.dsm_loss``; Song & Ermon 2019, Eq. 5-6).
* ``ssm``: sliced score matching (``score_matching.ssm_loss``; Song, Garg, Shi & Ermon 2019).

``make_objective`` binds a process and an objective's options once, giving the callable the trainer calls every
micro-step: ``loss(denoiser, x0, cond, generator) -> scalar``.

The held-out loss of training (``eps_mse`` at ``band_times``) is the eps-space error at fixed times and noise, the
one quantity every parameterisation can be compared on: E||eps_hat(x_t, t) - eps||^2 with eps_hat converted from
the network's output in ``parameterization.to_x0_eps``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ldm.diffusion.parameterization import Denoiser, diffusion_loss, to_x0_eps
from ldm.diffusion.score_matching import dsm_loss, ssm_loss
from ldm.diffusion.sde import GaussianProcess, bcast, randn

OBJECTIVES: dict[str, Callable[..., torch.Tensor]] = {
    "denoising": diffusion_loss,
    "dsm": dsm_loss,
    "ssm": ssm_loss,
}


@dataclass
class Objective:
    """A registered loss bound to its process and options: ``objective(denoiser, x0, cond, generator)``."""

    name: str
    process: GaussianProcess
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.name!r}; choose from {sorted(OBJECTIVES)}")

    def __call__(self, denoiser: Denoiser, x0: torch.Tensor, cond: Any, generator=None) -> torch.Tensor:
        return OBJECTIVES[self.name](denoiser, x0, cond, self.process, generator=generator, **self.options)


def make_objective(name: str, process: GaussianProcess, **options: Any) -> Objective:
    """The objective ``name`` over ``process`` with its keyword options (e.g. prediction, weighting for denoising)."""
    return Objective(name, process, dict(options))


def band_times(process: GaussianProcess, bands: int) -> torch.Tensor:
    """(bands,) float64: the training time at the centre quantile of each of ``bands`` equal bands, (k + 1/2) / bands.

    For uniform training times these are the centres of equal bands of t (on a discrete chain, the knot whose
    timestep lies there), from the least noisy to the noisiest.
    """
    if bands < 1:
        raise ValueError(f"bands must be >= 1, got {bands}")
    return process.time_at((torch.arange(bands, dtype=torch.float64) + 0.5) / bands)


def eps_mse(denoiser: Denoiser, x0: torch.Tensor, cond: Any, process: GaussianProcess, t: float, prediction: str,
            generator=None) -> torch.Tensor:
    """Per-sample eps-space error ||eps_hat - eps||^2 / D (B,) at time t, eps drawn from ``generator``(s)."""
    B = x0.shape[0]
    eps = randn(tuple(x0.shape), generator, x0.device, x0.dtype)  # (B, C, H, W)
    tt = torch.full((B,), float(t), dtype=torch.float64)
    alpha, sigma = process.alpha(tt), process.sigma(tt)  # (B,)
    x_t = bcast(alpha, x0) * x0 + bcast(sigma, x0) * eps
    dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    out = denoiser(x_t, process.model_time(tt).to(device=x0.device, dtype=dtype), cond)
    _, eps_hat = to_x0_eps(out.float(), x_t.float(), alpha.float().to(x0.device), sigma.float().to(x0.device),
                           prediction)
    return (eps_hat - eps.float()).pow(2).flatten(1).mean(1)  # (B,)
