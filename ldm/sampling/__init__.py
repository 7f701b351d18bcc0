"""Samplers over one denoiser interface, the sampler registry and guidance wrappers.

Public entry point::

    from ldm.diffusion import DiscreteVP, Predictor, make_betas
    from ldm.sampling import sample
    model = Predictor(my_denoiser, DiscreteVP(make_betas("linear", 1000)), prediction="eps")
    x0 = sample(model, (16, 4, 8, 8), sampler="dpmpp_2m", steps=20, generator=torch.Generator().manual_seed(0))

``my_denoiser(x_t, model_time, cond)`` is any callable returning the network's prediction.
"""

from __future__ import annotations

from typing import Any

import torch

from ldm.diffusion.flow import shift_time
from ldm.diffusion.parameterization import Predictor
from ldm.sampling.guidance import (
    ClassifierFreeGuidance, ClassifierGuidance, GuidanceInterval, Guided, concat_cond, guide,
)
from ldm.sampling.samplers import DEFAULT_CONTINUOUS_SPACING, DEFAULT_SPACING, SAMPLERS, check_finite_sde


def time_grid(process, sampler: str, steps: int, spacing: str | None = None, time_shift: float = 1.0) -> torch.Tensor:
    """The descending time grid ``sampler`` runs over: the given spacing, else the process's own default grid, else
    the sampler's default for discrete chains and continuous processes; warped by ``time_shift`` (SD3).

    Raises ValueError naming the problem for an unknown sampler or a grid the process cannot make (e.g. more steps
    than a discrete chain has), so callers can check settings before any model is loaded.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {sorted(SAMPLERS)}")
    if spacing is None:
        discrete = getattr(process, "T", None) is not None
        spacing = process.spacing or (
            DEFAULT_SPACING[sampler] if discrete else DEFAULT_CONTINUOUS_SPACING.get(sampler, "uniform"))
    ts = process.timesteps(steps, spacing)
    return shift_time(ts, time_shift) if time_shift != 1.0 else ts


def check_sampling(process, prediction: str, sampler: str, steps: int, spacing: str | None = None) -> None:
    """ValueError naming the problem when a model of this process and prediction cannot be sampled with these settings:
    an unknown sampler, a grid the process cannot make, a reverse SDE started where the forward SDE is singular (the
    flow at t = 1), or eps / score on a schedule with zero terminal SNR."""
    ts = time_grid(process, sampler, steps, spacing)
    if sampler == "euler_maruyama":
        check_finite_sde(process, float(ts[0]), sampler)
    if prediction in ("eps", "score") and float(process.alpha(1.0)) == 0.0:
        raise ValueError(f"this model predicts {prediction} on a schedule with zero terminal SNR: "
                         "x0 = (x_t - sigma eps) / alpha is undefined at t = 1; such models must predict v or x0")


@torch.no_grad()
def sample(model: Predictor, shape: tuple[int, ...], *, sampler: str = "ddpm", steps: int = 50, cond: Any = None,
           generator=None, spacing: str | None = None, time_shift: float = 1.0, device: torch.device | str = "cpu",
           x_T: torch.Tensor | None = None, dtype: torch.dtype = torch.float32, **options) -> torch.Tensor:
    """Draw x_T from the prior at the grid's first time; run a registered sampler over the default (or given) grid.

    ``time_shift`` warps the grid by SD3's shift t' = s t / (1 + (s - 1) t) (``ldm.diffusion.shift_time``);
    ``options`` go to the sampler (e.g. ``callback=``, ``eta=``, ``s_churn=``)."""
    ts = time_grid(model.process, sampler, steps, spacing, time_shift)
    x = model.process.prior_sample(shape, generator, device, dtype, t=float(ts[0])) if x_T is None else x_T
    return SAMPLERS[sampler](model, x, ts, cond=cond, generator=generator, **options)


__all__ = ["SAMPLERS", "ClassifierFreeGuidance", "ClassifierGuidance", "GuidanceInterval", "Guided", "check_sampling",
           "concat_cond", "guide", "sample", "time_grid"]
