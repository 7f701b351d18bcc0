"""EDM2's power-function EMA and its post-hoc reconstruction (Karras et al. 2024, "Analyzing and Improving the
Training Dynamics of Diffusion Models", Sec. 3.1-3.2 and the appendix on post-hoc EMA).

A power-function EMA averages the weights theta(tau) of training time tau in [0, t] with the profile
p_{gamma,t}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) (Sec. 3.1). Its relative width (std over t) is
sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))). The update after optimizer step t = 1, 2, ...

    theta_hat(t) = beta(t) theta_hat(t - 1) + (1 - beta(t)) theta(t),   beta(t) = (1 - 1/t)^(gamma + 1)

gives theta(k) the weight (k^(gamma+1) - (k-1)^(gamma+1)) / t^(gamma+1): exactly the profile integrated over
(k - 1, k], with theta piecewise constant in between, so the continuous-time algebra below is exact for it.

Post-hoc reconstruction (Sec. 3.2): snapshots theta_hat_i of profiles p_i = p_{gamma_i, t_i} span other profiles;
the coefficients x minimising || p_target - sum_i x_i p_i ||^2 in L2[0, inf) solve A x = b with the inner products
A_ij = <p_i, p_j>, b_i = <p_i, p_target> in closed form, and the EMA of the target profile is ~ sum_i x_i theta_hat_i.

This module tracks the EMAs on plain tensors (the full parameters, or a rank's ZeRO-3 partitions) and never gathers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

Tensor = torch.Tensor


def gamma_to_sigma_rel(gamma: float) -> float:
    """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (Karras et al. 2024, Sec. 3.1)."""
    if gamma <= -1:
        raise ValueError(f"a power EMA needs gamma > -1, got {gamma}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


# sigma_rel(gamma) peaks at gamma = (sqrt(5) - 3) / 2 (d/dgamma of its square vanishes there): the widest power EMA
SIGMA_REL_MAX = gamma_to_sigma_rel((5**0.5 - 3) / 2)  # 0.30028...


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent of a relative width: the largest real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma
    + (12 - s^-2) = 0, i.e. sigma_rel(gamma) solved for gamma on its decreasing branch gamma >= (sqrt(5) - 3) / 2."""
    if not 0 < sigma_rel <= SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.5f}], got {sigma_rel}")
    q = 1 / sigma_rel**2
    roots = np.roots([1.0, 7.0, 16.0 - q, 12.0 - q])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-6))  # the double root at the peak splits by ~1e-8


def profile_inner(gamma_a: float, t_a: float, gamma_b: float, t_b: float) -> float:
    """<p_a, p_b> = int_0^min(t_a, t_b) p_a p_b = (ga + 1)(gb + 1) / (ga + gb + 1) (t_lo / t_hi)^g_hi / t_hi, where
    (t_hi, g_hi) belong to the profile that ends later."""
    if t_a > t_b:
        gamma_a, t_a, gamma_b, t_b = gamma_b, t_b, gamma_a, t_a
    return (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1) * (t_a / t_b) ** gamma_b / t_b


def posthoc_coefficients(snapshots: Sequence[tuple[float, float]], gamma: float, step: float) -> Tensor:
    """x (n,) float64 with sum_i x_i p_{gamma_i, t_i} the least-squares fit of p_{gamma, step} (Sec. 3.2).

    ``snapshots`` are (gamma_i, t_i) pairs. A is positive semi-definite and nearly singular for close profiles;
    the minimum-norm least-squares solution keeps the coefficients small."""
    if not snapshots:
        raise ValueError("post-hoc reconstruction needs at least one snapshot")
    A = torch.tensor([[profile_inner(ga, ta, gb, tb) for gb, tb in snapshots] for ga, ta in snapshots],
                     dtype=torch.float64)
    b = torch.tensor([[profile_inner(ga, ta, gamma, step)] for ga, ta in snapshots], dtype=torch.float64)
    return torch.linalg.lstsq(A, b, rcond=1e-12, driver="gelsd").solution[:, 0]


def fit_error(snapshots: Sequence[tuple[float, float]], gamma: float, step: float, x: Tensor) -> float:
    """|| p_target - sum_i x_i p_i || / || p_target || in L2[0, inf): how well the snapshots span the target profile
    (0 for a profile that was snapshotted), from the same closed-form inner products."""
    A = torch.tensor([[profile_inner(ga, ta, gb, tb) for gb, tb in snapshots] for ga, ta in snapshots],
                     dtype=torch.float64)
    b = torch.tensor([profile_inner(ga, ta, gamma, step) for ga, ta in snapshots], dtype=torch.float64)
    c = profile_inner(gamma, step, gamma, step)
    x = x.to(torch.float64)
    return math.sqrt(max(float(x @ A @ x - 2 * x @ b + c), 0.0) / c)


@dataclass
class Snapshot:
    """One saved power EMA: its exponent, the optimizer step it was taken at, and its weights by name (in memory,
    or read on demand by ``load`` for snapshots on disk, so a reconstruction holds one snapshot at a time)."""

    gamma: float
    step: int
    weights: Mapping[str, Tensor] | None = None
    load: Callable[[], Mapping[str, Tensor]] | None = None

    def tensors(self) -> Mapping[str, Tensor]:
        return self.weights if self.weights is not None else self.load()


def reconstruct(snapshots: Sequence[Snapshot], sigma_rel: float | None = None, *, gamma: float | None = None,
                step: int | None = None) -> dict[str, Tensor]:
    """The EMA of relative width ``sigma_rel`` (or exponent ``gamma``) at ``step`` (default: the latest snapshot's),
    as sum_i x_i snapshot_i with the least-squares coefficients of the snapshots taken up to ``step``, in float64
    arithmetic, returned in float32. Snapshots are read one at a time."""
    if (sigma_rel is None) == (gamma is None):
        raise ValueError("give exactly one of sigma_rel and gamma")
    gamma = sigma_rel_to_gamma(sigma_rel) if gamma is None else gamma
    step = max(s.step for s in snapshots) if step is None else step
    used = [s for s in snapshots if s.step <= step]  # a later snapshot averages weights the target has not seen
    if not used:
        raise ValueError(f"no power EMA snapshot at or before step {step}")
    x = posthoc_coefficients([(s.gamma, float(s.step)) for s in used], gamma, float(step))
    acc: dict[str, Tensor] = {}
    for coef, snap in zip(x.tolist(), used):
        weights = snap.tensors()
        if acc and weights.keys() != acc.keys():
            raise KeyError(f"power EMA snapshot of step {snap.step} holds other tensors: "
                           f"{sorted(set(weights) ^ set(acc))[:3]}")
        for name, w in weights.items():
            if name not in acc:
                acc[name] = torch.zeros_like(w, dtype=torch.float64)
            acc[name] += coef * w.double()
    return {name: a.float() for name, a in acc.items()}


class PowerEMA:
    """Power-function EMAs of some tensors for several relative widths (EDM2 tracks sigma_rel 0.05 and 0.10).

    ``tensors`` maps names to the live tensors to average (parameters' data, or a rank's ZeRO-3 partitions); they
    are read at every ``update``. The EMAs are float32 copies, one set per width.
    """

    def __init__(self, tensors: Mapping[str, Tensor], sigma_rels: Sequence[float] = (0.05, 0.10)):
        if not sigma_rels:
            raise ValueError("track at least one relative width")
        self.sources = dict(tensors)
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.emas = [{n: t.detach().float().clone() for n, t in self.sources.items()} for _ in self.gammas]
        self.step = 0

    @torch.no_grad()
    def update(self, tensors: Mapping[str, Tensor] | None = None, step: int | None = None) -> None:
        """Fold in the weights after optimizer step ``step`` (default: one more than the last; the first copies them).

        ``tensors``: the current values by name (default: the tensors given at construction)."""
        self.step = self.step + 1 if step is None else int(step)
        if self.step < 1:
            raise ValueError(f"power EMA steps count from 1, got {self.step}")
        tensors = self.sources if tensors is None else tensors
        for gamma, ema in zip(self.gammas, self.emas):
            beta = (1 - 1 / self.step) ** (gamma + 1)
            for name, e in ema.items():
                e.lerp_(tensors[name].float(), 1 - beta)

    def snapshots(self) -> list[Snapshot]:
        """Copies of every tracked EMA at the current step, to save with a checkpoint."""
        return [Snapshot(g, self.step, {n: e.clone() for n, e in ema.items()})
                for g, ema in zip(self.gammas, self.emas)]

    def flat_state(self) -> dict[str, Tensor]:
        """Every tracked EMA in one flat dict, ``"<sigma_rel>/<name>"`` (the width as its repr, read back by
        ``split_flat``): what a checkpoint or snapshot file holds."""
        return {f"{s!r}/{n}": e for s, ema in zip(self.sigma_rels, self.emas) for n, e in ema.items()}

    def state_dict(self) -> dict:
        return {"step": self.step, "sigma_rels": list(self.sigma_rels),
                "emas": [{n: e.clone() for n, e in ema.items()} for ema in self.emas]}

    def load_state_dict(self, state: dict) -> None:
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
            raise ValueError(f"power EMA widths {state['sigma_rels']} != {self.sigma_rels}")
        for ema, saved in zip(self.emas, state["emas"]):
            if saved.keys() != ema.keys():
                raise KeyError(f"power EMA state names differ: {sorted(set(saved) ^ set(ema))[:3]}")
            for name, e in ema.items():
                if saved[name].shape != e.shape:
                    raise ValueError(f"power EMA {name}: shape {tuple(saved[name].shape)} != {tuple(e.shape)}")
                e.copy_(saved[name])
        self.step = int(state["step"])


def split_flat(flat: Mapping[str, Tensor]) -> dict[float, dict[str, Tensor]]:
    """``PowerEMA.flat_state`` back to {sigma_rel: {name: tensor}}, widths in the order of the file."""
    out: dict[float, dict[str, Tensor]] = {}
    for key, t in flat.items():
        width, _, name = key.partition("/")
        out.setdefault(float(width), {})[name] = t
    return out
