"""Guidance as wrappers that keep the interface of what they wrap.

* Classifier-free guidance (Ho & Salimans 2022): eps_hat = eps(null) + gamma (eps(y) - eps(null)), with one
  batched forward over the unconditional and conditional halves. Any linear parameterisation (eps, x0, v)
  combines the same way at fixed (x_t, t), so the wrapper works on raw network outputs.
* CFG rescale (Lin et al. 2023, Sec. 3.4): x_rescaled = x_cfg std(x_cond) / std(x_cfg) per sample, then
  phi x_rescaled + (1 - phi) x_cfg; on the network's outputs, as the paper does on its v-prediction model.
* Guidance interval (Kynkaenniemi et al. 2024, Sec. 3): guidance only where sigma_lo < sigma_edm <= sigma_hi,
  elsewhere the conditional model (EDM's noise level sigma_edm = sigma / alpha of the process).
* Classifier guidance (Dhariwal & Nichol 2021): eps_hat = eps - gamma sigma grad log p(y | x_t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ldm.diffusion.parameterization import Denoiser, Predictor, score_from_eps, to_x0_eps
from ldm.diffusion.sde import GaussianProcess, as_time, bcast

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
    """A denoiser (x_t, t, Guided) -> guided output, wrapping a denoiser (x_t, t, cond) -> output.

    ``rescale`` is Lin et al.'s phi in [0, 1] (0: plain CFG; they use 0.7)."""

    def __init__(self, denoiser: Denoiser, scale: float, rescale: float = 0.0):
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"the CFG rescale phi must be in [0, 1], got {rescale}")
        self.denoiser, self.scale, self.rescale = denoiser, float(scale), float(rescale)

    def __call__(self, x: Tensor, t: Tensor, cond: Guided) -> Tensor:
        if not isinstance(cond, Guided):
            raise TypeError("classifier-free guidance needs a Guided(cond, uncond) condition")
        if self.scale == 0.0:  # exactly the unconditional model, one forward
            return self.denoiser(x, t, cond.uncond)
        if self.scale == 1.0:  # exactly the conditional model, one forward
            return self.denoiser(x, t, cond.cond)
        out = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), concat_cond(cond.uncond, cond.cond))  # (2B, ...)
        out_uncond, out_cond = out.chunk(2)
        guided = out_uncond + self.scale * (out_cond - out_uncond)
        if self.rescale == 0.0:
            return guided
        dims = tuple(range(1, guided.dim()))
        std_cond = out_cond.std(dim=dims, keepdim=True, correction=0)  # (B, 1, ...)
        std_guided = guided.std(dim=dims, keepdim=True, correction=0)
        ratio = torch.where(std_guided > 0, std_cond / std_guided, torch.ones_like(std_guided))
        return self.rescale * (guided * ratio) + (1 - self.rescale) * guided


class GuidanceInterval:
    """Classifier-free guidance only for noise levels sigma_lo < sigma_edm(t) <= sigma_hi, the conditional model
    elsewhere (Kynkaenniemi et al. 2024, Sec. 3): a denoiser (x_t, model_time, Guided) like the CFG it wraps.

    The process maps the model time to sigma_edm = sigma / alpha (EDM's noise level, Karras et al. 2022); per sample,
    so a batch whose samples sit at different times gets guidance exactly where each one's level lies inside.
    """

    def __init__(self, guidance: ClassifierFreeGuidance, process: GaussianProcess, sigma_lo: float = 0.0,
                 sigma_hi: float = math.inf):
        self.guidance, self.process = guidance, process
        self.sigma_lo, self.sigma_hi = float(sigma_lo), float(sigma_hi)

    def __call__(self, x: Tensor, t: Tensor, cond: Guided) -> Tensor:
        if not isinstance(cond, Guided):
            raise TypeError("a guidance interval needs a Guided(cond, uncond) condition")
        sigma = self.process.edm_sigma(self.process.time_from_model(t.detach().double().cpu()))  # (B,)
        inside = (sigma > self.sigma_lo) & (sigma <= self.sigma_hi)  # (B,)
        if bool(inside.all()):
            return self.guidance(x, t, cond)
        conditional = self.guidance.denoiser
        if not bool(inside.any()):
            return conditional(x, t, cond.cond)
        guided, plain = self.guidance(x, t, cond), conditional(x, t, cond.cond)
        return torch.where(inside.to(guided.device).reshape((-1,) + (1,) * (guided.dim() - 1)), guided, plain)


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
        eps = eps - self.scale * bcast(sigma, eps) * grad.to(eps.dtype)
        return to_x0_eps(eps, x_t, alpha, sigma, "eps")

    def score(self, x_t: Tensor, t: float | Tensor, cond: Any = None) -> Tensor:
        return score_from_eps(self(x_t, t, cond)[1], self.process.sigma(as_time(t)))


def guide(denoiser: Denoiser, scale: float, *, rescale: float = 0.0, interval: tuple[float, float] | None = None,
          process: GaussianProcess | None = None):
    """Classifier-free guidance of ``denoiser`` with scale, rescale phi and, given an interval (sigma_lo, sigma_hi),
    guidance only inside it (the interval needs the ``process`` to read sigma from the model time)."""
    guided = ClassifierFreeGuidance(denoiser, scale, rescale=rescale)
    if interval is None:
        return guided
    if process is None:
        raise ValueError("a guidance interval needs the process (to map model times to sigma)")
    return GuidanceInterval(guided, process, *interval)
