"""Training-time distributions pi(t): which noise levels a training step sees, for every process.

* "uniform": the process's own ``sample_time`` (t ~ U[t_min, 1]; the discrete chain's U{0..T-1}; NCSN's levels).
* "logit_normal": t = sigmoid(m + s z), z ~ N(0, 1) (Esser et al. 2024, Eq. 19; SD3 trains with m = 0, s = 1).
* "mode": t = f_mode(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1), heavy-tailed around the middle for
  s > 0, with -1 <= s <= 2 / (pi - 2) (Esser et al. 2024, Eq. 20; s = 1.29 in their study).
* "cosmap": t = 1 - 1 / (tan(pi u / 2) + 1) (Esser et al. 2024, Eq. 21: the cosine schedule's SNRs).
* "edm": ln sigma_edm ~ N(P_mean, P_std^2), P_mean = -1.2, P_std = 1.2 (Karras et al. 2022, Table 1), placed at the
  process's time of that noise level, sigma_edm = sigma / alpha (the inverse of ``GaussianProcess.edm_sigma``).

The first four are densities over the process's unit time (on the flow, the RF time of Esser et al.); "edm" is a
density over the noise level, the same for every process. Then SD3's shift t' = s t / (1 + (s - 1) t) (Eq. 23).
Times are clamped to [t_min, 1], the range every process trains on. Randomness only from the passed generator(s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ldm.diffusion.flow import shift_time
from ldm.diffusion.sde import GaussianProcess, rand, randn

Tensor = torch.Tensor
TIME_SAMPLINGS = ("uniform", "logit_normal", "mode", "cosmap", "edm")
DEFAULT_LOCATION = {"logit_normal": (0.0, 1.0), "edm": (-1.2, 1.2)}  # (m, s) / (P_mean, P_std) of the papers
MODE_SCALE_MAX = 2 / (math.pi - 2)  # f_mode is monotone for -1 <= s <= 2 / (pi - 2)


@dataclass(frozen=True)
class TimeSampling:
    """A training-time distribution: ``sampling(process, n, generator) -> t (n,)`` float64 on the CPU."""

    kind: str = "uniform"
    mean: float | None = None  # logit_normal m / edm P_mean; None: the paper's value
    std: float | None = None  # logit_normal s / edm P_std; None: the paper's value
    mode_scale: float = 1.29
    shift: float = 1.0

    def __post_init__(self):
        if self.kind not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time sampling {self.kind!r}; choose from {TIME_SAMPLINGS}")
        if (self.mean is not None or self.std is not None) and self.kind not in DEFAULT_LOCATION:
            raise ValueError(f"mean/std are parameters of logit_normal and edm, not of {self.kind!r}")
        if self.std is not None and self.std <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if not -1 <= self.mode_scale <= MODE_SCALE_MAX:
            raise ValueError(f"mode_scale must be in [-1, {MODE_SCALE_MAX:.4f}] (f_mode monotone), "
                             f"got {self.mode_scale}")
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")

    def location(self) -> tuple[float, float]:
        m, s = DEFAULT_LOCATION[self.kind]
        return (m if self.mean is None else self.mean), (s if self.std is None else self.std)

    def __call__(self, process: GaussianProcess, n: int, generator=None) -> Tensor:
        if self.kind == "uniform":
            t = process.sample_time(n, generator, device="cpu")
        elif self.kind == "logit_normal":
            m, s = self.location()
            t = torch.sigmoid(m + s * randn((n,), generator, dtype=torch.float64))
        elif self.kind == "mode":
            u = rand(n, generator)
            t = 1 - u - self.mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
        elif self.kind == "cosmap":
            t = 1 - 1 / (torch.tan(math.pi / 2 * rand(n, generator)) + 1)
        else:  # edm
            m, s = self.location()
            t = process.time_from_edm_sigma((m + s * randn((n,), generator, dtype=torch.float64)).exp())
        if self.kind != "uniform":
            t = t.clamp(process.t_min, 1.0)
        return shift_time(t, self.shift).clamp(process.t_min, 1.0) if self.shift != 1.0 else t
