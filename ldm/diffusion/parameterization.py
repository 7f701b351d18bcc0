"""Network parameterisations and the training objective, converted in this one place.

With x_t = alpha x0 + sigma eps a network may predict
  eps   (Ho et al. 2020),
  x0    (the clean sample),
  v     = alpha eps - sigma x0 (Salimans & Ho 2022, App. D; for VP alpha^2 + sigma^2 = 1),
  score = grad log p_t(x_t) = -eps / sigma (denoising score matching, Vincent 2011; Song & Ermon 2019),
  velocity = eps - x0, the flow-matching target (Lipman et al. 2023, Eq. 23 with sigma_min = 0; Liu et al. 2023,
  Eq. 1): dx_t/dt on the rectified flow x_t = (1 - t) x0 + t eps; on any other process the same linear target,
  inverted by x0 = (x_t - sigma u) / (alpha + sigma), eps = (x_t + alpha u) / (alpha + sigma) (alpha + sigma > 0).
Everything downstream (samplers, guidance, likelihoods) consumes (x0, eps) and never branches on the choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ldm.diffusion.sde import GaussianProcess, as_time, bcast, randn, to_device

Tensor = torch.Tensor
PREDICTIONS = ("eps", "x0", "v", "score", "velocity")
WEIGHTINGS = ("uniform", "min_snr", "edm")

# (x_t, model_time (B,), cond) -> raw network output
Denoiser = Callable[[Tensor, Tensor, Any], Tensor]


def time_dtype(x: Tensor) -> torch.dtype:
    """Model times go to networks in float32, or in float64 when the computation itself is float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def to_x0_eps(output: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, prediction: str) -> tuple[Tensor, Tensor]:
    """Convert a network output of the given kind into (x0, eps)."""
    a, s = bcast(alpha, x_t), bcast(sigma, x_t)
    if prediction == "eps":
        return (x_t - s * output) / a, output
    if prediction == "x0":
        return output, (x_t - a * output) / s
    if prediction == "v":
        norm = a**2 + s**2
        return (a * x_t - s * output) / norm, (s * x_t + a * output) / norm
    if prediction == "score":
        eps = -s * output
        return (x_t - s * eps) / a, eps
    if prediction == "velocity":
        return (x_t - s * output) / (a + s), (x_t + a * output) / (a + s)
    raise ValueError(f"unknown prediction {prediction!r}; choose from {PREDICTIONS}")


def from_x0_eps(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, prediction: str) -> Tensor:
    """The quantity a network of the given kind should output for (x0, eps): the regression target."""
    a, s = bcast(alpha, x0), bcast(sigma, x0)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return a * eps - s * x0
    if prediction == "score":
        return -eps / s
    if prediction == "velocity":
        return eps - x0
    raise ValueError(f"unknown prediction {prediction!r}; choose from {PREDICTIONS}")


def score_from_eps(eps: Tensor, sigma: Tensor) -> Tensor:
    """score = -eps / sigma (Song et al. 2021, Eq. 3 for the Gaussian kernel)."""
    return -eps / bcast(sigma, eps)


def loss_weight(snr: Tensor, prediction: str, weighting: str = "uniform", gamma: float = 5.0,
                scale2: Tensor | float = 1.0, sigma_data: float = 0.5) -> Tensor:
    """Per-sample weight of the MSE on the target, so that one objective reads the same in every parameterisation.

    A target error maps to an eps error at fixed x_t by ||d eps||^2 = ||d x0||^2 SNR = ||d v||^2 a^2 / (a^2 + s^2)^2
    = ||d score||^2 s^2 = ||d velocity||^2 a^2 / (a + s)^2, with a^2 / (a + s)^2 = SNR / (1 + sqrt(SNR))^2 and
    scale2 = alpha^2 + sigma^2 (1 for VP processes).
    min_snr: min-SNR-gamma (Hang et al. 2023, Eq. 9), eps-space weight min(SNR, gamma) / SNR; per target
    eps: min(1, gamma / SNR), x0: min(SNR, gamma), v: min(SNR, gamma) / ((SNR + 1) scale2),
    score: min(1, gamma / SNR) scale2 / (SNR + 1), velocity: min(SNR, gamma) / (1 + sqrt(SNR))^2.
    edm: EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 on the x0 error (Karras et al. 2022,
    Table 1), sigma = sigma_edm = SNR^(-1/2): x0-space weight SNR + 1 / sigma_data^2, converted the same way.
    Written so SNR = 0 (zero terminal SNR) stays finite where the target allows it (not eps or score under edm).
    """
    if weighting == "uniform":
        return torch.ones_like(snr)
    if weighting == "edm":
        w0 = snr + 1 / sigma_data**2  # weight of the x0 error
        factor = {"eps": lambda: 1 / snr, "x0": lambda: torch.ones_like(snr),
                  "v": lambda: 1 / ((snr + 1) * scale2), "score": lambda: scale2 / (snr * (snr + 1)),
                  "velocity": lambda: 1 / (1 + snr.sqrt()) ** 2}.get(prediction)
        if factor is None:
            raise ValueError(f"unknown prediction {prediction!r}; choose from {PREDICTIONS}")
        return w0 * factor()
    if weighting != "min_snr":
        raise ValueError(f"unknown weighting {weighting!r}; choose from {WEIGHTINGS}")
    eps_weight = (gamma / snr).clamp(max=1.0)  # = min(SNR, gamma) / SNR; 1 at SNR = 0
    if prediction == "eps":
        return eps_weight
    if prediction == "x0":
        return snr.clamp(max=gamma)
    if prediction == "v":
        return snr.clamp(max=gamma) / ((snr + 1) * scale2)
    if prediction == "score":
        return eps_weight * scale2 / (snr + 1)
    if prediction == "velocity":
        return snr.clamp(max=gamma) / (1 + snr.sqrt()) ** 2
    raise ValueError(f"unknown prediction {prediction!r}; choose from {PREDICTIONS}")


@dataclass
class Predictor:
    """A network denoiser seen through its process: (x_t, t) -> (x0, eps), t continuous in [0, 1]."""

    denoiser: Denoiser
    process: GaussianProcess
    prediction: str = "eps"

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; choose from {PREDICTIONS}")

    def __call__(self, x_t: Tensor, t: float | Tensor, cond: Any = None) -> tuple[Tensor, Tensor]:
        t = as_time(t)  # () shared by the batch, or (B,)
        alpha, sigma = self.process.alpha(t), self.process.sigma(t)
        if self.prediction in ("eps", "score") and bool((alpha == 0).any()):
            raise ValueError(f"x0 is undefined from a {self.prediction} prediction at zero SNR (alpha = 0): "
                             "a zero-terminal-SNR chain needs prediction 'v' or 'x0' (Lin et al. 2023, Sec. 3.2)")
        m = to_device(self.process.model_time(t), x_t.device, time_dtype(x_t)).expand(x_t.shape[0])  # (B,)
        out = self.denoiser(x_t, m, cond)
        return to_x0_eps(out, x_t, alpha, sigma, self.prediction)

    def score(self, x_t: Tensor, t: float | Tensor, cond: Any = None) -> Tensor:
        return score_from_eps(self(x_t, t, cond)[1], self.process.sigma(as_time(t)))


def diffusion_loss(
    denoiser: Denoiser,
    x0: Tensor,
    cond: Any,
    process: GaussianProcess,
    *,
    prediction: str = "eps",
    weighting: str = "uniform",
    min_snr_gamma: float = 5.0,
    offset_noise: float = 0.0,
    time_sampling: Callable[[GaussianProcess, int, Any], Tensor] | None = None,
    sigma_data: float = 0.5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The simplified DDPM objective E ||target - net(x_t, t)||^2 (Ho et al. Eq. 14), any target and weighting.

    Offset noise adds a per-channel constant to eps (Guttenberg 2023) so the model can shift mean brightness:
    eps = z + offset_noise * z_c with z_c ~ N(0, 1) shared over a channel's pixels. ``time_sampling`` (e.g. a
    ``timesteps.TimeSampling``) draws the training times; None: the process's own ``sample_time``. With an
    ``edm.EDMPrecond`` denoiser, prediction "x0", weighting "edm" and time sampling "edm" this is EDM's loss
    (Karras et al. 2022, Eq. 2 and Table 1).
    """
    B = x0.shape[0]
    draw = time_sampling if time_sampling is not None else lambda p, n, g: p.sample_time(n, g, device="cpu")
    t = draw(process, B, generator)  # (B,) float64
    eps = randn(tuple(x0.shape), generator, x0.device, x0.dtype)  # (B, C, H, W)
    if offset_noise:
        eps = eps + offset_noise * randn((B, x0.shape[1]) + (1,) * (x0.dim() - 2), generator, x0.device, x0.dtype)
    alpha, sigma = process.alpha(t), process.sigma(t)  # (B,)
    x_t = bcast(alpha, x0) * x0 + bcast(sigma, x0) * eps
    target = from_x0_eps(x0, eps, alpha, sigma, prediction)
    out = denoiser(x_t, to_device(process.model_time(t), x0.device, time_dtype(x0)), cond)
    per_sample = (out.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
    weight = loss_weight(process.snr(t), prediction, weighting, min_snr_gamma, alpha**2 + sigma**2, sigma_data)
    return (to_device(weight, per_sample.device, per_sample.dtype) * per_sample).mean()
