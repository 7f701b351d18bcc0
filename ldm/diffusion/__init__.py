"""Diffusion math: schedules, forward processes and SDEs, parameterisations, training objectives, likelihoods."""

from ldm.diffusion.likelihood import ELBO, Likelihood, bits_per_dim, ddpm_elbo, ode_likelihood, odeint
from ldm.diffusion.objectives import OBJECTIVES, Objective, band_times, eps_mse, make_objective
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
from ldm.diffusion.score_matching import dsm_loss, ssm_loss
from ldm.diffusion.sde import VESDE, VPSDE, DiscreteVE, DiscreteVP, GaussianProcess, SubVPSDE, randn

__all__ = [
    "ELBO", "OBJECTIVES", "PREDICTIONS", "SCHEDULES", "VESDE", "VPSDE", "DiscreteVE", "DiscreteVP",
    "GaussianProcess", "Likelihood", "Objective", "Predictor", "SubVPSDE", "band_times", "bits_per_dim",
    "ddpm_elbo", "diffusion_loss", "dsm_loss", "eps_mse", "from_x0_eps", "loss_weight", "make_betas",
    "make_objective", "ode_likelihood", "odeint", "randn", "rescale_zero_terminal_snr", "score_from_eps",
    "ssm_loss", "to_x0_eps",
]
