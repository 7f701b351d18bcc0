"""The diffusion section's objects: the forward process, the training-time distribution, the objective and the
preconditioning a network is trained and sampled as."""

from __future__ import annotations

from ldm.config import DiffusionConfig
from ldm.diffusion import (
    VESDE, VPSDE, DiscreteVE, DiscreteVP, EDMPrecond, FlowMatching, GaussianProcess, Objective, SubVPSDE, TimeSampling,
    make_betas, make_objective,
)


def build_process(cfg: DiffusionConfig) -> GaussianProcess:
    """The forward process the model is trained on (and samplers run over)."""
    if cfg.process == "discrete":
        return DiscreteVP(make_betas(cfg.schedule, cfg.num_timesteps, cfg.beta_start, cfg.beta_end,
                                     cfg.zero_terminal_snr))
    if cfg.process == "vp":
        return VPSDE(time_scale=cfg.num_timesteps - 1)
    if cfg.process == "subvp":
        return SubVPSDE(time_scale=cfg.num_timesteps - 1)
    if cfg.process == "ncsn":
        return DiscreteVE(levels=cfg.num_timesteps)
    if cfg.process == "flow":
        return FlowMatching(time_scale=cfg.num_timesteps)
    return VESDE()


def build_time_sampling(cfg: DiffusionConfig) -> TimeSampling | None:
    """The training-time distribution of the config (``diffusion.time_*``); None: the process's own uniform times."""
    if cfg.time_sampling == "uniform" and cfg.time_shift == 1.0:
        return None
    return TimeSampling(cfg.time_sampling, cfg.time_mean, cfg.time_std, cfg.mode_scale, cfg.time_shift)


def build_objective(cfg: DiffusionConfig, process: GaussianProcess) -> Objective:
    """The training loss of the config as ``loss(denoiser, x0, cond, generator) -> scalar`` (the denoiser given to
    it is the preconditioned one, ``precondition``)."""
    if cfg.objective == "denoising":
        return make_objective("denoising", process, prediction=cfg.prediction, weighting=cfg.weighting,
                              min_snr_gamma=cfg.min_snr_gamma, offset_noise=cfg.offset_noise,
                              time_sampling=build_time_sampling(cfg), sigma_data=cfg.sigma_data)
    return make_objective(cfg.objective, process)


def precondition(cfg: DiffusionConfig, process: GaussianProcess, network):
    """The denoiser a network is trained and sampled as: EDM's preconditioning around it, or the network itself."""
    return EDMPrecond(network, process, cfg.sigma_data) if cfg.precondition == "edm" else network
