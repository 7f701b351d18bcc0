"""Builders: config sections -> objects. Modules take plain keyword arguments; only this file reads configs."""

from __future__ import annotations

import dataclasses

import torch

from ldm.config import DiffusionConfig, SamplingConfig, TextEncoderConfig, UNetConfig
from ldm.diffusion import (
    VESDE, VPSDE, DiscreteVE, DiscreteVP, EDMPrecond, FlowMatching, GaussianProcess, SubVPSDE, TimeSampling,
    diffusion_loss, dsm_loss, make_betas, ssm_loss,
)
from ldm.sampling import ClassifierFreeGuidance, GuidanceInterval


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


def build_time_sampling(cfg: DiffusionConfig) -> TimeSampling:
    """The training-time distribution of the config (``diffusion.time_*``)."""
    return TimeSampling(cfg.time_sampling, cfg.time_mean, cfg.time_std, cfg.mode_scale, cfg.time_shift)


def precondition(cfg: DiffusionConfig, process: GaussianProcess, network):
    """The denoiser a network is trained and sampled as: EDM's preconditioning around it, or the network itself."""
    return EDMPrecond(network, process, cfg.sigma_data) if cfg.precondition == "edm" else network


def build_guidance(cfg: SamplingConfig, process: GaussianProcess, denoiser, scale: float):
    """Classifier-free guidance of the config: rescale phi, and the sigma interval where it applies."""
    guided = ClassifierFreeGuidance(denoiser, scale, rescale=cfg.guidance_rescale)
    return guided if cfg.guidance_interval is None else GuidanceInterval(guided, process, *cfg.guidance_interval)


def build_objective(cfg: DiffusionConfig, process: GaussianProcess):
    """The training loss of the config as ``loss(denoiser, x0, cond, generator) -> scalar``."""
    if cfg.objective == "dsm":
        return lambda denoiser, x0, cond, generator: dsm_loss(denoiser, x0, cond, process, generator=generator)
    if cfg.objective == "ssm":
        return lambda denoiser, x0, cond, generator: ssm_loss(denoiser, x0, cond, process, generator=generator)
    time_sampling = None if cfg.time_sampling == "uniform" and cfg.time_shift == 1.0 else build_time_sampling(cfg)
    return lambda denoiser, x0, cond, generator: diffusion_loss(
        precondition(cfg, process, denoiser), x0, cond, process, prediction=cfg.prediction, weighting=cfg.weighting,
        min_snr_gamma=cfg.min_snr_gamma, offset_noise=cfg.offset_noise, time_sampling=time_sampling,
        sigma_data=cfg.sigma_data, generator=generator)


def unet_kwargs(cfg: UNetConfig, in_channels: int, context_dim: int) -> dict:
    """UNet constructor arguments: the preset, then every key the config sets explicitly."""
    from ldm.models import unet_preset

    explicit = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                if f.name != "preset" and getattr(cfg, f.name) is not None}
    base = unet_preset(cfg.preset) if cfg.preset else {}
    if "num_heads" in explicit:
        base.pop("head_dim", None)
    if "head_dim" in explicit:
        base.pop("num_heads", None)
    return {**base, **explicit, "in_channels": in_channels, "out_channels": in_channels, "context_dim": context_dim}


def build_unet(cfg: UNetConfig, in_channels: int, context_dim: int) -> torch.nn.Module:
    from ldm.models import UNet

    return UNet(**unet_kwargs(cfg, in_channels, context_dim))


def build_text_encoder(cfg: TextEncoderConfig, device: torch.device | str = "cpu"):
    from ldm.conditioning import build_text_encoder as build

    options = {k: getattr(cfg, k) for k in ("layer", "mask_padding", "model_name", "tokenizer_path")
               if getattr(cfg, k) is not None}
    return build(cfg.kind, cfg.path, cfg.max_length, device, **options)
