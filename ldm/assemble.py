"""Assembly: the one place that turns a config into the objects a run or a loaded model needs.

    check_inputs(cfg)      every path, registry name and size a run will use, checked before anything loads
    assemble(cfg, device)  Components: frozen autoencoder, cached text encoder, null condition, process, objective,
                           latent shape; ``components.unet(state)`` and ``components.pipeline(unet)`` build the rest
    load_exported(folder)  the pipeline of an exported model folder (``ldm.export`` layout)
    from_weights(...)      the pipeline of a config + state dicts (e.g. a run's checkpoint, read by ``ldm.train``)
    build_evaluator(cfg)   the evaluation protocol of ``cfg.eval`` (reference statistics, classifier, prompts)

The trainer, the export loader, the evaluator and every command get their objects from here, so a model is put
together the same way wherever it is used. Modules take plain keyword arguments; only this file reads configs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm.conditioning import Cond
from ldm.config import ConfigError, DiffusionConfig, LDMConfig, TextEncoderConfig, UNetConfig
from ldm.diffusion import (
    VESDE, VPSDE, DiscreteVE, DiscreteVP, EDMPrecond, FlowMatching, GaussianProcess, Objective, SubVPSDE, TimeSampling,
    make_betas, make_objective,
)
from ldm.precision import autocast_frozen, frozen_dtype

AUTOENCODER_CONFIG = "config.json"


# --- config sections -> objects -------------------------------------------------------------------------
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


# --- checks before anything loads -------------------------------------------------------------------------
def autoencoder_config(path: str | Path) -> dict[str, Any]:
    """The saved autoencoder's constructor config (config.json), read without loading weights."""
    folder = Path(path)
    file = folder / AUTOENCODER_CONFIG
    if not file.is_file():
        raise ConfigError(f"autoencoder.path: {folder} is not a saved autoencoder folder (no {AUTOENCODER_CONFIG}; "
                          "train one with ldm-train-autoencoder)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"autoencoder.path: {file} is unreadable: {e}") from None
    if not (folder / "model.safetensors").is_file():
        raise ConfigError(f"autoencoder.path: {folder} has no model.safetensors")
    return config


def downsample_factor(ae_config: dict[str, Any]) -> int:
    return 2 ** (len(ae_config.get("block_out_channels", [64])) - 1)


def check_inputs(cfg: LDMConfig, *, training: bool = True) -> None:
    """Every path, shard set and size the run will use, checked before any model loads (ConfigError naming the key).

    Pure value checks live in ``LDMConfig.check``; these need the filesystem (and read only small files).
    """
    from ldm.data import dataset_size, resolve_shards
    from ldm.pipeline import check_sampling

    ae = autoencoder_config(cfg.autoencoder.path)
    factor = downsample_factor(ae)
    if cfg.data.image_size % factor:
        raise ConfigError(f"data.image_size: {cfg.data.image_size} is not divisible by the autoencoder's "
                          f"downsampling factor {factor} ({cfg.autoencoder.path})")
    if cfg.text_encoder.path is not None and not Path(cfg.text_encoder.path).exists():
        raise ConfigError(f"text_encoder.path: no such file or folder {cfg.text_encoder.path}")
    process = build_process(cfg.diffusion)
    for key, s in (("sampling", cfg.sampling), ("eval", cfg.eval)):
        if key == "eval" and not (cfg.eval.every or cfg.eval.final):
            continue
        try:
            check_sampling(process, cfg.diffusion.prediction, s.sampler, s.steps)
        except ValueError as e:
            raise ConfigError(f"{key}.sampler/{key}.steps: {e}") from None
    if not training:
        return
    out = Path(cfg.run.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"run.output_dir: {out} exists and is not a folder")
    check_resume(cfg)
    spec = cfg.data.latents or cfg.data.train
    key = "data.latents" if cfg.data.latents else "data.train"
    try:
        check_shards(resolve_shards(spec, "train"), key)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{key}: {e}") from None
    if dataset_size(spec, "train") == 0:
        raise ConfigError(f"{key}: the train split of {spec} has no samples")
    if cfg.data.latents is not None:
        check_latent_cache(cfg)
    if cfg.eval.every or cfg.train.val_every:
        if not cfg.data.val:
            raise ConfigError("data.val: held-out shards are needed for train.val_every / eval.every")
        try:
            resolve_shards(cfg.data.val, "val")
        except (ValueError, OSError) as e:
            raise ConfigError(f"data.val: {e}") from None


def check_shards(urls: list[str], key: str) -> None:
    """Local shards are tar archives (their headers are read; remote ones are the stream's to check): none readable
    is a ConfigError naming the key; some unreadable ones are reported once here and skipped by the stream."""
    import logging
    import tarfile

    local = [u for u in urls if Path(u).is_file()]
    bad = [u for u in local if not tarfile.is_tarfile(u)]
    if local and len(bad) == len(local) == len(urls):
        raise ConfigError(f"{key}: no readable shard: {len(bad)} file(s) are not tar archives, e.g. {bad[0]}")
    if bad:
        logging.getLogger(__name__).warning("%s: %d of %d shards are not tar archives and will be skipped, e.g. %s",
                                            key, len(bad), len(urls), bad[0])


def check_resume(cfg: LDMConfig) -> None:
    """A run resuming from checkpoints in run.output_dir does not change what their weights mean (prediction kind,
    process, UNet shape, text encoder...): ConfigError naming every such key with both values."""
    from ldm.config import load_config, resume_conflicts

    out = Path(cfg.run.output_dir)
    if not (out / "checkpoints" / "latest").is_file() or not (out / "config.yaml").is_file():
        return
    try:
        saved = load_config(LDMConfig, out / "config.yaml")
    except ConfigError as e:
        raise ConfigError(f"run.output_dir: cannot read the resumed run's {out / 'config.yaml'}: {e}") from None
    conflicts = resume_conflicts(saved, cfg)
    if conflicts:
        raise ConfigError(f"run.output_dir: {out} holds checkpoints of another model; resuming would change "
                          f"{'; '.join(conflicts)} (checkpoint -> this run): use another run.output_dir or the "
                          "checkpoint's settings")


def check_latent_cache(cfg: LDMConfig) -> None:
    """The latent cache was made by the configured autoencoder, at the configured image size."""
    from ldm.data.latents import check_latent_cache as check
    from ldm.data.latents import folder_hash

    try:
        info = check(cfg.data.latents, folder_hash(cfg.autoencoder.path))
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"data.latents: {e}") from None
    if info.get("image_size", cfg.data.image_size) != cfg.data.image_size:
        raise ConfigError(f"data.latents: the cache holds latents of {info['image_size']} px images but "
                          f"data.image_size is {cfg.data.image_size}: re-encode it or set data.image_size")


# --- the assembled system ---------------------------------------------------------------------------------
@dataclass
class Components:
    """Everything but the UNet's weights: what training, sampling and evaluation share."""

    cfg: LDMConfig
    device: torch.device
    autoencoder: Any  # the frozen AutoencoderKL
    text_encoder: Any  # a frozen text encoder (prompts -> Cond), memoised per caption
    null_cond: Cond  # (1, L, D): the empty-prompt embedding the model is trained / was trained with
    process: GaussianProcess
    objective: Objective
    latent_shape: tuple[int, int, int]

    @property
    def context_dim(self) -> int:
        return int(self.text_encoder.dim)

    def denoiser(self, model: torch.nn.Module):
        """The denoiser (x_t, model_time, cond) -> prediction a UNet (or its DeepSpeed engine) is trained and sampled
        as: the network's output, inside EDM's preconditioning when the config asks for it."""
        from ldm.pipeline import unet_denoiser

        return precondition(self.cfg.diffusion, self.process, unet_denoiser(model))

    def unet(self, state: dict[str, torch.Tensor] | None = None, source: str = "<state dict>") -> torch.nn.Module:
        """A fresh UNet of the config (random weights, or ``state`` loaded strictly)."""
        unet = build_unet(self.cfg.model, self.latent_shape[0], self.context_dim)
        if state is not None:
            from ldm.models import load_unet_weights

            load_unet_weights(unet, {k: v.float() for k, v in state.items()}, layout="diffusers")
        return unet

    def pipeline(self, unet: torch.nn.Module):
        """The text-to-image pipeline over ``unet`` (moved to the device, eval mode, frozen)."""
        from ldm.pipeline import TextToImage

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
             null_cond: Cond | None = None) -> Components:
    """Load the frozen parts of ``cfg`` and build its process and objective.

    ``autoencoder_path`` overrides ``cfg.autoencoder.path`` (an export carries its own copy); ``null_cond`` is the
    stored null condition of a trained model (default: the text encoder's embedding of the empty prompt).
    """
    from autoencoder import load_pretrained
    from ldm.conditioning import null_condition
    from ldm.conditioning.cache import CachedTextEncoder

    device = torch.device(device)
    frozen = frozen_dtype(cfg.train.frozen_dtype, device)  # autocast of the frozen parts (auto: bf16 on CUDA)
    autoencoder = autocast_frozen(load_pretrained(autoencoder_path or cfg.autoencoder.path, device=device), frozen,
                                  ("encode", "decode"))
    text_encoder = CachedTextEncoder(autocast_frozen(build_text_encoder(cfg.text_encoder, device), frozen))
    null = null_cond if null_cond is not None else null_condition(text_encoder.encoder)
    null = {k: v.to(device) for k, v in null.items()}
    process = build_process(cfg.diffusion)
    size = cfg.data.image_size // autoencoder.downsample_factor
    latent_shape = (int(autoencoder.config["latent_channels"]), size, size)
    return Components(cfg, device, autoencoder, text_encoder, null, process, build_objective(cfg.diffusion, process),
                      latent_shape)


def from_weights(cfg: LDMConfig, unet_state: dict[str, torch.Tensor], null_cond: Cond,
                 device: torch.device | str = "cpu", autoencoder_path: str | Path | None = None):
    """The pipeline of a config and its trained weights (an export's or a checkpoint's)."""
    parts = assemble(cfg, device, autoencoder_path=autoencoder_path, null_cond=null_cond)
    return parts.pipeline(parts.unet(unet_state))


def load_exported(folder: str | Path, device: torch.device | str = "cpu", use_ema: bool = True):
    """(pipeline, config) of an exported model folder; reads files only."""
    from ldm.export import read_export

    export = read_export(folder, use_ema=use_ema)
    pipe = from_weights(export.cfg, export.unet, export.null_cond, device, export.autoencoder)
    return pipe, export.cfg


def build_evaluator(cfg: LDMConfig, device: torch.device | str = "cpu", progress: bool = True, **overrides: Any):
    """The evaluation protocol of ``cfg.eval`` on ``cfg.data`` (reference statistics and classifier from the cache,
    else computed and cached); ``overrides`` replace protocol settings (e.g. num_images from the command line)."""
    from ldm.eval import Evaluator

    e, d = cfg.eval, cfg.data
    settings = dict(data=e.data or d.train, image_size=d.image_size, caption=d.caption, num_images=e.num_images,
                    reference_images=e.reference_images, seed=e.seed, inception=e.inception,
                    classifier=e.classifier, classifier_label=e.classifier_label, bootstrap=e.bootstrap,
                    clip=e.clip, clip_model=e.clip_model, batch_size=e.batch_size, cache_dir=e.cache_dir)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Evaluator(**settings, device=device, progress=progress)
    except (ValueError, FileNotFoundError) as e:  # bad data or settings of the protocol: a config problem
        raise ConfigError(f"eval: {e}") from None
