"""Diffusion math: schedules, forward processes and SDEs, parameterisations, training objectives, likelihoods."""

from ldm.diffusion.edm import EDMPrecond, edm_coefficients
from ldm.diffusion.flow import FlowMatching, resolution_shift, shift_time
from ldm.diffusion.grids import karras_sigmas
from ldm.diffusion.likelihood import ELBO, Likelihood, bits_per_dim, ddpm_elbo, ode_likelihood, odeint
from ldm.diffusion.objectives import OBJECTIVES, Objective, band_times, eps_mse, make_objective
from ldm.diffusion.parameterization import (
    PREDICTIONS,
    WEIGHTINGS,
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
from ldm.diffusion.timesteps import TIME_SAMPLINGS, TimeSampling

__all__ = [
    "ELBO", "OBJECTIVES", "PREDICTIONS", "SCHEDULES", "TIME_SAMPLINGS", "WEIGHTINGS", "DiscreteVE", "DiscreteVP",
    "EDMPrecond", "FlowMatching", "GaussianProcess", "Likelihood", "Objective", "Predictor", "SubVPSDE",
    "TimeSampling", "VESDE", "VPSDE", "band_times", "bits_per_dim", "ddpm_elbo", "diffusion_loss", "dsm_loss",
    "edm_coefficients", "eps_mse", "from_x0_eps", "karras_sigmas", "loss_weight", "make_betas", "make_objective",
    "odeint", "ode_likelihood", "randn", "rescale_zero_terminal_snr", "resolution_shift", "score_from_eps",
    "shift_time", "ssm_loss", "to_x0_eps",
]
