"""A mixture of isotropic Gaussians whose noisy marginals, denoisers and class posteriors are closed form.

Data x0 ~ sum_k w_k N(mu_k, s_k^2 I). Under x_t = alpha x0 + sigma eps every noisy marginal is again a mixture,
p_t(x) = sum_k w_k N(x; alpha mu_k, v_k I) with v_k = alpha^2 s_k^2 + sigma^2, so with the responsibilities
r_k(x) = p(k | x_t = x) the exact denoiser is (Tweedie; per component a Gaussian conditional):

    E[x0 | x_t] = sum_k r_k (mu_k + alpha s_k^2 (x - alpha mu_k) / v_k)
    E[eps | x_t] = sum_k r_k sigma (x - alpha mu_k) / v_k,     score = -E[eps | x_t] / sigma.

Conditioning on a class y (the component label) gives the single Gaussian component, and the exact classifier
is log p(y | x_t) = log r_y(x). Everything is float64 and vectorised over the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
UNCOND = -1  # class label meaning "no condition": the full mixture


@dataclass
class Mixture:
    weights: Tensor  # (K,)
    means: Tensor  # (K, d)
    stds: Tensor  # (K,)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """n exact draws (n, d) and their component labels (n,); fixed labels draw from those components."""
        if labels is None:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[labels] + self.stds[labels, None] * z, labels

    def sample_noisy(self, n: int, alpha: float, sigma: float, generator: torch.Generator) -> Tensor:
        """n exact draws of x_t = alpha x0 + sigma eps: the exact marginal, e.g. the prior at t = 1."""
        x0, _ = self.sample(n, generator)
        return alpha * x0 + sigma * torch.randn(x0.shape, generator=generator, dtype=torch.float64)

    def log_resp(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """log r_k(x) (B, K) under the noisy marginal at (alpha, sigma) (B,) or (1,), and the variances v_k."""
        log_r, v = self._log_resp_t(x.T, alpha[None], sigma[None])
        return log_r.T, v.T

    def _log_resp_t(self, xt: Tensor, a: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        # transposed layout (K, B): reductions over the few components run over the leading dimension (fast)
        v = a**2 * self.stds[:, None] ** 2 + s**2  # (K, B) or (K, 1)
        sq = (xt**2).sum(0) - 2 * a * (self.means @ xt) + a**2 * (self.means**2).sum(1)[:, None]  # (K, B)
        logits = self.weights.log()[:, None] - 0.5 * sq / v - 0.5 * self.dim * torch.log(2 * math.pi * v)
        return logits - logits.logsumexp(0), v

    def posterior(self, x: Tensor, alpha: Tensor, sigma: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(E[x0 | x_t], E[eps | x_t]) for x (B, d); rows with a label >= 0 condition on that component."""
        xt, a, s = x.T, alpha[None], sigma[None]  # (d, B), (1, B) or (1, 1)
        log_r, v = self._log_resp_t(xt, a, s)
        r = log_r.exp()  # (K, B)
        if labels is not None:
            onehot = torch.nn.functional.one_hot(labels.clamp_min(0), len(self.weights)).T.to(r)  # (K, B)
            r = torch.where(labels >= 0, onehot, r)
        c = a * self.stds[:, None] ** 2 / v  # (K, B|1) per-component gain of E[x0 | x, k]
        x0 = (r * c).sum(0) * xt + self.means.T @ (r * (1 - a * c))  # (d, B)
        rv = r / v
        eps = s * (rv.sum(0) * xt - a * (self.means.T @ rv))  # (d, B)
        return x0.T, eps.T

    def denoiser(self, process, prediction: str = "eps"):
        """The exact network of a process and parameterisation: (x_t, model_time, cond) -> eps | x0 | v | score |
        velocity (eps - x0).

        ``cond`` is None (the mixture) or a (B,) long tensor of class labels, UNCOND (-1) for the mixture.
        """

        def net(x: Tensor, m: Tensor, cond: Tensor | None) -> Tensor:
            t = process.time_from_model(m.double())  # (B,)
            if bool((m == m[0]).all()):  # one time for the whole batch (what samplers pass): compute it once
                t = t[:1]
            alpha, sigma = process.alpha(t), process.sigma(t)  # (B,) or (1,)
            x0, eps = self.posterior(x.double(), alpha, sigma, cond)
            out = {"eps": lambda: eps, "x0": lambda: x0, "v": lambda: alpha[:, None] * eps - sigma[:, None] * x0,
                   "score": lambda: -eps / sigma[:, None], "velocity": lambda: eps - x0}[prediction]()
            return out.to(x.dtype)

        return net

    def grad_log_class_prob(self, process):
        """grad_x log p(y | x_t) by autograd through the closed-form responsibilities: (x, t, labels) -> (B, d)."""

        def grad(x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
            x = x.detach().double().requires_grad_(True)
            log_r, _ = self.log_resp(x, process.alpha(t), process.sigma(t))
            (g,) = torch.autograd.grad(log_r.gather(1, labels[:, None]).sum(), x)
            return g

        return grad


def make_mixture(weights, means, stds) -> Mixture:
    f = lambda v: torch.as_tensor(v, dtype=torch.float64)  # noqa: E731
    return Mixture(f(weights) / f(weights).sum(), f(means), f(stds))


def sliced_w2(x: Tensor, y: Tensor, directions: Tensor) -> float:
    """Sliced Wasserstein-2 squared between two equal-size samples: mean over directions of 1-D W2^2 of projections."""
    px, _ = (x.double() @ directions).sort(0)  # (N, P)
    py, _ = (y.double() @ directions).sort(0)
    return float((px - py).pow(2).mean())


def directions(dim: int, count: int, seed: int = 1234) -> Tensor:
    """count fixed unit directions, uniform on the sphere: (dim, count)."""
    u = torch.randn(dim, count, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return u / u.norm(dim=0, keepdim=True)


class SlicedW1:
    """Distance of a sample to a mixture: sliced Wasserstein-1 against a fixed exact reference draw.

    Along each of ``n_dirs`` fixed unit directions the sorted projections of an n-sample are matched with the
    quantiles (levels (i + 1/2) / n) of a ``ref_factor`` n exact reference draw; the statistic is the mean absolute
    difference over levels and directions. Its noise floor is the same statistic for independent exact n-draws
    (``floor``): a sampler that reproduces the mixture scores like those, a biased one scores higher.
    """

    def __init__(self, mix: Mixture, n: int, n_dirs: int = 64, ref_factor: int = 4, seed: int = 0):
        self.mix, self.n = mix, n
        self.dirs = directions(mix.dim, n_dirs, seed)
        ref, _ = mix.sample(ref_factor * n, torch.Generator().manual_seed(seed + 1))
        proj, _ = (ref @ self.dirs).sort(0)  # (M, P)
        pos = (torch.arange(n, dtype=torch.float64) + 0.5) * ref_factor - 0.5  # level (i + 1/2)/n in the reference
        lo = pos.floor().long().clamp(0, len(ref) - 2)
        w = (pos - lo)[:, None]
        self.quantiles = proj[lo] * (1 - w) + proj[lo + 1] * w  # (n, P)

    def __call__(self, x: Tensor) -> float:
        if x.shape != (self.n, self.mix.dim):
            raise ValueError(f"expected a sample of shape {(self.n, self.mix.dim)}, got {tuple(x.shape)}")
        proj, _ = (x.double() @ self.dirs).sort(0)
        return float((proj - self.quantiles).abs().mean())

    def floor(self, reps: int = 16, seed: int = 10_000) -> Tensor:
        """The statistic for ``reps`` independent exact n-draws (what a perfect sampler scores)."""
        return torch.tensor([self(self.mix.sample(self.n, torch.Generator().manual_seed(seed + i))[0])
                             for i in range(reps)], dtype=torch.float64)
