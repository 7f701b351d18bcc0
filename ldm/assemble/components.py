"""The assembled system: what training, sampling and evaluation share, built from the config in one way.

    assemble(cfg, device)  Components: frozen autoencoder, cached text encoder, null condition, batch conditioning,
                           process, objective, latent shape; ``components.unet(state)`` and
                           ``components.pipeline(unet)`` build the rest
    from_weights(...)      the pipeline of a config + state dicts (e.g. a run's checkpoint, read by ``ldm.train``)
    load_exported(folder)  the pipeline of an exported model folder (``ldm.export`` layout)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autoencoder import load_pretrained
from ldm.assemble import text_encoders
from ldm.assemble.checks import check_text_cache_fits
from ldm.assemble.diffusion import build_objective, build_process, precondition
from ldm.assemble.models import build_unet, micro_conditioned, unet_kwargs
from ldm.conditioning import BatchConditioning, Cond, null_condition
from ldm.conditioning.cache import CachedTextEncoder
from ldm.config import LDMConfig
from ldm.data.text_cache import load_cached_null_condition
from ldm.diffusion import GaussianProcess, Objective
from ldm.export import read_export
from ldm.pipeline import TextToImage, unet_denoiser
from ldm.precision import autocast_frozen, frozen_dtype


@dataclass
class Components:
    """Everything but the UNet's weights: what training, sampling and evaluation share."""

    cfg: LDMConfig
    device: torch.device
    autoencoder: Any  # the frozen AutoencoderKL
    text_encoder: Any  # a frozen text encoder (prompts -> Cond), memoised per caption; built on first use from a cache
    null_cond: Cond  # (1, L, D): the empty-prompt embedding the model is trained / was trained with
    process: GaussianProcess
    objective: Objective
    latent_shape: tuple[int, int, int]
    context_dim: int  # D, the text features' width
    pooled_dim: int | None  # P, the pooled text vector's width (None: the encoder gives none)

    @functools.cached_property
    def micro_conditioned(self) -> bool:
        """True when the network takes size/crop ids (``time_ids``): SDXL's UNet, PixArt's size-conditioned DiT."""
        return micro_conditioned(self.cfg.model, self.unet_kwargs())

    @functools.cached_property
    def conditioning(self) -> BatchConditioning:
        """The condition of training (and held-out) samples: cached or encoded text, size/crop ids, the null one."""
        return BatchConditioning(self.text_encoder, self.null_cond, self.device, self.micro_conditioned,
                                 self.autoencoder.downsample_factor)

    def unet_kwargs(self) -> dict[str, Any]:
        channels, side = self.latent_shape[0], self.latent_shape[1]
        return unet_kwargs(self.cfg.model, channels, self.context_dim, self.pooled_dim, side)

    def denoiser(self, model: torch.nn.Module):
        """The denoiser (x_t, model_time, cond) -> prediction a UNet (or its DeepSpeed engine) is trained and sampled
        as: the network's output, inside EDM's preconditioning when the config asks for it."""
        return precondition(self.cfg.diffusion, self.process, unet_denoiser(model))

    def unet(self, state: dict[str, torch.Tensor] | None = None, source: str = "<state dict>") -> torch.nn.Module:
        """A fresh network of the config (``model.kind``): random weights or model.init_from's, with model.lora's
        adapters; ``state``: the trained module's own state loaded over them, or plain full weights (a plain one)."""
        return build_unet(self.cfg.model, self.latent_shape[0], self.context_dim, self.pooled_dim, state, source,
                          self.latent_shape[1])

    def pipeline(self, unet: torch.nn.Module) -> TextToImage:
        """The text-to-image pipeline over ``unet`` (moved to the device, eval mode, frozen)."""
        unet = unet.to(self.device).eval().requires_grad_(False)
        return TextToImage(unet, self.autoencoder, self.text_encoder, self.process, self.cfg.diffusion.prediction,
                           self.null_cond, self.latent_shape, denoiser=self.denoiser(unet),
                           defaults=sampling_defaults(self.cfg))


def sampling_defaults(cfg: LDMConfig) -> dict[str, Any]:
    """Sampling options a model was configured with that every caller inherits unless it sets them (guidance
    rescale and interval, the grid's time shift)."""
    s = cfg.sampling
    return {"guidance_rescale": s.guidance_rescale, "guidance_interval": s.guidance_interval,
            "time_shift": s.time_shift if s.time_shift is not None else cfg.diffusion.time_shift}


def assemble(cfg: LDMConfig, device: torch.device | str = "cpu", *, autoencoder_path: str | Path | None = None,
             null_cond: Cond | None = None, training: bool = False) -> Components:
    """Load the frozen parts of ``cfg`` and build its process and objective.

    ``autoencoder_path`` overrides ``cfg.autoencoder.path`` (an export carries its own copy); ``null_cond`` is the
    stored null condition of a trained model (default: the text encoder's, kind ``text_encoder.null_condition``).
    ``training`` with ``data.text_cache``: the text widths and the null condition come from the cache, and the text
    encoder is built only if something asks it to encode prompts (a sample grid, an evaluation).
    """
    device = torch.device(device)
    frozen = frozen_dtype(cfg.train.frozen_dtype, device)  # autocast of the frozen parts (auto: bf16 on CUDA)
    autoencoder = autocast_frozen(load_pretrained(autoencoder_path or cfg.autoencoder.path, device=device), frozen,
                                  ("encode", "decode"))

    def text_encoder_now():
        return autocast_frozen(text_encoders.build_text_encoder(cfg.text_encoder, device), frozen)

    if training and cfg.data.text_cache is not None:
        info = check_text_cache_fits(cfg, False)
        text_encoder = CachedTextEncoder(text_encoder_now)  # built only if something needs prompts encoded
        context_dim, pooled_dim = int(info["dim"]), info.get("pooled_dim")
        null = null_cond if null_cond is not None else load_cached_null_condition(cfg.data.text_cache)
    else:
        text_encoder = CachedTextEncoder(text_encoder_now())
        encoder = text_encoder.encoder
        context_dim, pooled_dim = int(encoder.dim), (int(encoder.pooled_dim) if encoder.pooled else None)
        null = null_cond if null_cond is not None else null_condition(encoder, cfg.text_encoder.null_condition)
    null = {k: v.to(device) for k, v in null.items()}
    process = build_process(cfg.diffusion)
    size = cfg.data.image_size // autoencoder.downsample_factor
    latent_shape = (int(autoencoder.config["latent_channels"]), size, size)
    return Components(cfg, device, autoencoder, text_encoder, null, process, build_objective(cfg.diffusion, process),
                      latent_shape, context_dim, pooled_dim)


def from_weights(cfg: LDMConfig, unet_state: dict[str, torch.Tensor], null_cond: Cond,
                 device: torch.device | str = "cpu", autoencoder_path: str | Path | None = None) -> TextToImage:
    """The pipeline of a config and its trained weights (an export's or a checkpoint's)."""
    parts = assemble(cfg, device, autoencoder_path=autoencoder_path, null_cond=null_cond)
    return parts.pipeline(parts.unet(unet_state))


def load_exported(folder: str | Path, device: torch.device | str = "cpu",
                  use_ema: bool = True) -> tuple[TextToImage, LDMConfig]:
    """(pipeline, config) of an exported model folder; reads files only."""
    export = read_export(folder, use_ema=use_ema)
    pipe = from_weights(export.cfg, export.unet, export.null_cond, device, export.autoencoder)
    return pipe, export.cfg
