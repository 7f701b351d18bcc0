"""Assembly: the one place that turns a config into the objects a run or a loaded model needs.

    check_inputs(cfg)      every path, registry name and size a run will use, checked before anything loads
    assemble(cfg, device)  Components: frozen autoencoder, cached text encoder, null condition, process, objective,
                           latent shape; ``components.unet(state)`` and ``components.pipeline(unet)`` build the rest
    load_exported(folder)  the pipeline of an exported model folder (``ldm.export`` layout)
    from_weights(...)      the pipeline of a config + state dicts (e.g. a run's checkpoint, read by ``ldm.train``)
    build_evaluator(cfg)   the evaluation protocol of ``cfg.eval`` (reference statistics, classifier, prompts)

The trainer, the export loader, the evaluator and every command get their objects from here, so a model is put
together the same way wherever it is used. Modules take plain keyword arguments; only this file (and its UNet part,
``ldm.assemble_unet``: init_from weights, LoRA, plain weights for exports) reads configs.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm.assemble_unet import (  # noqa: F401 - re-exported: the UNet part of the assembly
    build_unet, init_weights, plain_state, state_dims, trained_unet, unet_kwargs,
)
from ldm.conditioning import Cond
from ldm.config import ConfigError, DiffusionConfig, LDMConfig, TextEncoderConfig
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


def text_encoder_specs(cfg: TextEncoderConfig) -> list[dict[str, Any]]:
    """``build_text_encoder`` arguments of every encoder the section describes (one, SDXL's two, or a list)."""
    if cfg.kind == "sdxl":
        from ldm.conditioning import sdxl_text_encoders

        return sdxl_text_encoders(cfg.path, cfg.max_length)
    if cfg.encoders is not None:
        return [e.spec(cfg.max_length) for e in cfg.encoders]
    return [cfg.spec(cfg.max_length)]


def build_text_encoder(cfg: TextEncoderConfig, device: torch.device | str = "cpu"):
    """The frozen text encoder of the section: one encoder, or a composite (features concatenated, pooled from one)."""
    from ldm.conditioning import build_text_encoder as build
    from ldm.conditioning import build_text_encoders

    specs = text_encoder_specs(cfg)
    if cfg.kind == "sdxl" or cfg.encoders is not None:
        return build_text_encoders(specs, device, pooled_from=cfg.pooled_index())
    spec = dict(specs[0])
    return build(spec.pop("kind"), spec.pop("path"), spec.pop("max_length"), device, **spec)


def text_fingerprint(cfg: TextEncoderConfig) -> str:
    """The fingerprint a text cache made by this section's encoder carries: settings and file bytes, no model loads."""
    from ldm.conditioning import files_fingerprint

    try:
        return files_fingerprint(text_encoder_specs(cfg), cfg.null_condition, cfg.pooled_index())
    except (OSError, ValueError) as e:
        raise ConfigError(f"text_encoder.path: cannot fingerprint the text encoder: {e}") from None


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
    from ldm.data.source import train_source, val_source
    from ldm.pipeline import check_sampling

    ae = autoencoder_config(cfg.autoencoder.path)
    factor = downsample_factor(ae)
    if cfg.data.image_size % factor:
        raise ConfigError(f"data.image_size: {cfg.data.image_size} is not divisible by the autoencoder's "
                          f"downsampling factor {factor} ({cfg.autoencoder.path})")
    te = cfg.text_encoder
    for key, path in [("text_encoder.path", te.path)] + [(f"text_encoder.encoders[{i}].path", e.path)
                                                         for i, e in enumerate(te.encoders or [])]:
        if path is not None and not Path(path).exists():
            raise ConfigError(f"{key}: no such file or folder {path}")
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
    cfg.train.check_compile_options()
    out = Path(cfg.run.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"run.output_dir: {out} exists and is not a folder")
    check_resume(cfg)
    if cfg.model.init_from is not None:
        init_weights(cfg.model.init_from)  # names what it found instead of weights
    src = train_source(cfg.data)
    try:
        urls = resolve_shards(src.spec, "train")
        check_shards(urls, src.key)
        size = dataset_size(src.spec, "train", src.holdout)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{src.key}: {e}") from None
    if size == 0:
        raise ConfigError(f"{src.key}: the train split of {src.spec} has no samples")
    if cfg.data.latents is not None:
        check_latent_cache(cfg, cfg.data.latents, "data.latents")
    if cfg.data.text_cache is not None:
        check_text_cache(cfg, src.latents)
    if cfg.data.buckets is not None:
        check_buckets(cfg, urls, factor)
    if cfg.eval.every or cfg.train.val_every:
        try:
            val = val_source(cfg.data)
            if val is None:
                raise ValueError("held-out shards are needed for train.val_every / eval.every")
            resolve_shards(val.spec, "val")
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


def check_latent_cache(cfg: LDMConfig, spec: str, key: str) -> None:
    """The latent cache was made by the configured autoencoder, at the configured image size."""
    from ldm.data.latents import check_latent_cache as check
    from ldm.data.latents import folder_hash

    try:
        info = check(spec, folder_hash(cfg.autoencoder.path))
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{key}: {e}") from None
    if info.get("image_size", cfg.data.image_size) != cfg.data.image_size:
        raise ConfigError(f"{key}: the cache holds latents of {info['image_size']} px images but "
                          f"data.image_size is {cfg.data.image_size}: re-encode it or set data.image_size")


def check_text_cache(cfg: LDMConfig, latents: bool) -> dict[str, Any]:
    """The text cache was made by the configured text encoder (fingerprints from files: no encoder loads), holds its
    null condition, and (over latent shards) latents of the configured autoencoder; returns its ``text`` section."""
    from ldm.data.text_cache import check_text_cache as check
    from ldm.data.text_cache import load_cached_null_condition

    spec = cfg.data.text_cache
    try:
        info = check(spec, text_fingerprint(cfg.text_encoder))
        load_cached_null_condition(spec)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"data.text_cache: {e}") from None
    if info.get("max_length") not in (None, cfg.text_encoder.max_length):
        raise ConfigError(f"data.text_cache: the cache holds {info['max_length']} tokens per caption but "
                          f"text_encoder.max_length is {cfg.text_encoder.max_length}")
    if latents:
        check_latent_cache(cfg, spec, "data.text_cache")
    return info


def check_buckets(cfg: LDMConfig, urls: list[str], factor: int) -> None:
    """Bucket sides divide by the autoencoder's downsampling; bucketing reads local shards by offset."""
    from ldm.data.buckets import bucket_sizes

    sizes = bucket_sizes(cfg.data.buckets.sizes, cfg.data.image_size, cfg.data.buckets.multiple,
                         cfg.data.buckets.max_ratio)
    bad = [s for s in sizes if s[0] % factor or s[1] % factor]
    if bad:
        raise ConfigError(f"data.buckets: sides of {bad[:3]} are not multiples of the autoencoder's downsampling "
                          f"factor {factor} (set data.buckets.multiple to a multiple of it)")
    remote = [u for u in urls if not Path(u).is_file()]
    if remote:
        raise ConfigError(f"data.buckets: bucketing reads samples by their offset in local shard files; "
                          f"{len(remote)} shard(s) are not local files, e.g. {remote[0]}")


# --- the assembled system ---------------------------------------------------------------------------------
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
        """True when the UNet takes SDXL's pooled text and size/crop ids (``time_ids``)."""
        return self.unet_kwargs().get("addition_time_embed_dim") is not None

    def unet_kwargs(self) -> dict[str, Any]:
        return unet_kwargs(self.cfg.model, self.latent_shape[0], self.context_dim, self.pooled_dim)

    def denoiser(self, model: torch.nn.Module):
        """The denoiser (x_t, model_time, cond) -> prediction a UNet (or its DeepSpeed engine) is trained and sampled
        as: the network's output, inside EDM's preconditioning when the config asks for it."""
        from ldm.pipeline import unet_denoiser

        return precondition(self.cfg.diffusion, self.process, unet_denoiser(model))

    def condition(self, batch: dict) -> Cond:
        """A training batch's condition on the device: its cached text embeddings, or the encoder's of its captions;
        with SDXL conditioning also the size/crop ``time_ids`` (B, 6) of its images (defaults: uncropped, full size)."""
        from ldm.conditioning import micro_conditions

        if "context" in batch:  # from a text cache
            cond = {k: batch[k] for k in ("context", "context_mask", "pooled") if k in batch}
        else:
            cond = self.text_encoder(batch["caption"])  # (B, L, D), (B, L)[, (B, P)]
        cond = {k: v.to(self.device) for k, v in cond.items()}
        if self.micro_conditioned:
            pixels = batch["image"] if "image" in batch else batch["latent"]
            factor = 1 if "image" in batch else self.autoencoder.downsample_factor
            size = (pixels.shape[-2] * factor, pixels.shape[-1] * factor)  # (H, W) trained at
            cond["time_ids"] = micro_conditions(batch.get("original_size", size), batch.get("crop_top_left", (0, 0)),
                                                size, batch=pixels.shape[0]).to(self.device)  # (B, 6)
        return cond

    def unet(self, state: dict[str, torch.Tensor] | None = None, source: str = "<state dict>") -> torch.nn.Module:
        """A fresh UNet of the config: random weights or model.init_from's, with model.lora's adapters; ``state``: the
        trained module's own state loaded over them, or plain full weights (a plain UNet)."""
        return trained_unet(self.cfg.model, self.latent_shape[0], self.context_dim, self.pooled_dim, state, source)

    def plain_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Plain full weights of a trained state (LoRA adapters merged into init_from's weights)."""
        return plain_state(self.unet(state))

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
             null_cond: Cond | None = None, training: bool = False) -> Components:
    """Load the frozen parts of ``cfg`` and build its process and objective.

    ``autoencoder_path`` overrides ``cfg.autoencoder.path`` (an export carries its own copy); ``null_cond`` is the
    stored null condition of a trained model (default: the text encoder's, kind ``text_encoder.null_condition``). ``training``
    with ``data.text_cache``: the text widths and the null condition come from the cache, and the text encoder is
    built only if something asks it to encode prompts (a sample grid, an evaluation).
    """
    from autoencoder import load_pretrained
    from ldm.conditioning import null_condition
    from ldm.conditioning.cache import CachedTextEncoder

    device = torch.device(device)
    frozen = frozen_dtype(cfg.train.frozen_dtype, device)  # autocast of the frozen parts (auto: bf16 on CUDA)
    autoencoder = autocast_frozen(load_pretrained(autoencoder_path or cfg.autoencoder.path, device=device), frozen,
                                  ("encode", "decode"))

    def text_encoder_now():
        return autocast_frozen(build_text_encoder(cfg.text_encoder, device), frozen)

    if training and cfg.data.text_cache is not None:
        from ldm.data.text_cache import load_cached_null_condition

        info = check_text_cache(cfg, False)
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
