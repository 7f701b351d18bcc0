"""Diffusion math: schedules, forward processes and SDEs, parameterisations, the training objective."""

from ldm.diffusion.parameterization import (
    PREDICTIONS,
    Predictor,
    diffusion_loss,
    from_x0_eps,
    loss_weight,
    score_from_eps,
    to_x0_eps,
)
from ldm.diffusion.schedules import SCHEDULES, make_betas, rescale_zero_terminal_snr
from ldm.diffusion.sde import VESDE, VPSDE, DiscreteVP, GaussianProcess, SubVPSDE, randn

__all__ = [
    "PREDICTIONS", "SCHEDULES", "DiscreteVP", "GaussianProcess", "Predictor", "SubVPSDE", "VESDE", "VPSDE",
    "diffusion_loss", "from_x0_eps", "loss_weight", "make_betas", "randn", "rescale_zero_terminal_snr",
    "score_from_eps", "to_x0_eps",
]
