"""What every sampler shares: the walk over a time grid, noise from the passed generator(s), the callback type."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ldm.diffusion.sde import randn

Tensor = torch.Tensor
# callback(i, t, x, x0_hat): once per grid interval i with the time t of the interval's first evaluation (after
# EDM's churn), the state x the network saw there and its clean estimate x0_hat at (x, t); on the last interval
# x0_hat is the returned sample (annealed_langevin denoises once more after it). It must not modify x or x0_hat
# (they are the sampler's own tensors).
Callback = Optional[Callable[[int, float, Tensor, Tensor], None]]


def noise_like(x: Tensor, generator) -> Tensor:
    """Standard normal noise shaped like x, from one generator or one per batch element."""
    return randn(tuple(x.shape), generator, x.device, x.dtype)


def intervals(ts: Tensor) -> list[tuple[float, float, bool]]:
    """Consecutive (t, s) pairs of the grid as python floats, plus whether s is the final time 0."""
    ts = [float(v) for v in ts]
    if ts[-1] != 0.0:
        raise ValueError("the time grid must end at 0")
    return [(t, s, i == len(ts) - 2) for i, (t, s) in enumerate(zip(ts[:-1], ts[1:]))]
