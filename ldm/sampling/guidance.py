"""Guidance as wrappers that keep the interface of what they wrap.

* Classifier-free guidance (Ho & Salimans 2022): eps_hat = eps(null) + gamma (eps(y) - eps(null)), with one
  batched forward over the unconditional and conditional halves. Any linear parameterisation (eps, x0, v)
  combines the same way at fixed (x_t, t), so the wrapper works on raw network outputs.
* Classifier guidance (Dhariwal & Nichol 2021): eps_hat = eps - gamma sigma grad log p(y | x_t).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ldm.diffusion.parameterization import Denoiser, Predictor, score_from_eps, to_x0_eps
from ldm.diffusion.sde import _bcast, as_time

Tensor = torch.Tensor


def concat_cond(a: Any, b: Any) -> Any:
    """Concatenate two conditions (tensors, or dicts/tuples of tensors) along the batch dimension."""
    if a is None and b is None:
        return None
    if isinstance(a, Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: concat_cond(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        return type(a)(concat_cond(x, y) for x, y in zip(a, b))
    raise TypeError(f"cannot batch conditions of type {type(a).__name__}")


@dataclass
class Guided:
    """A condition paired with its null (or negative-prompt) condition, for classifier-free guidance."""

    cond: Any
    uncond: Any


class ClassifierFreeGuidance:
    """A denoiser (x_t, t, Guided) -> guided output, wrapping a denoiser (x_t, t, cond) -> output."""

    def __init__(self, denoiser: Denoiser, scale: float):
        self.denoiser, self.scale = denoiser, float(scale)

    def __call__(self, x: Tensor, t: Tensor, cond: Guided) -> Tensor:
        if not isinstance(cond, Guided):
            raise TypeError("classifier-free guidance needs a Guided(cond, uncond) condition")
        if self.scale == 0.0:  # exactly the unconditional model, one forward
            return self.denoiser(x, t, cond.uncond)
        if self.scale == 1.0:  # exactly the conditional model, one forward
            return self.denoiser(x, t, cond.cond)
        out = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), concat_cond(cond.uncond, cond.cond))  # (2B, ...)
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + self.scale * (out_cond - out_uncond)


class ClassifierGuidance:
    """A Predictor whose eps is shifted by a classifier's gradient: eps - gamma sigma grad_x log p(y | x_t).

    ``grad_log_prob(x_t, t, cond)`` gets the continuous times t (B,) float64 and returns grad_x log p(y | x_t);
    it runs with gradients enabled (samplers run under no_grad). At gamma = 1 with the exact gradient the
    guided score is the conditional score grad log p(x_t | y) (Bayes' rule; Song et al. 2021, Eq. 14).
    """

    def __init__(self, model: Predictor, grad_log_prob: Callable[[Tensor, Tensor, Any], Tensor], scale: float):
        self.model, self.grad_log_prob, self.scale = model, grad_log_prob, float(scale)
        self.process = model.process

    def __call__(self, x_t: Tensor, t: float | Tensor, cond: Any = None) -> tuple[Tensor, Tensor]:
        t = as_time(t)
        if t.dim() == 0:
            t = t.expand(x_t.shape[0])
        _, eps = self.model(x_t, t, cond)
        alpha, sigma = self.process.alpha(t), self.process.sigma(t)
        with torch.enable_grad():
            grad = self.grad_log_prob(x_t, t, cond)  # (B, ...) grad of log p(y | x_t)
        eps = eps - self.scale * _bcast(sigma, eps) * grad.to(eps.dtype)
        return to_x0_eps(eps, x_t, alpha, sigma, "eps")

    def score(self, x_t: Tensor, t: float | Tensor, cond: Any = None) -> Tensor:
        return score_from_eps(self(x_t, t, cond)[1], self.process.sigma(as_time(t)))
