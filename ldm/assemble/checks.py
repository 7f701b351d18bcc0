"""Checks of a run's inputs before anything loads: every path, shard set, cache and size the config names, read from
the filesystem (small files only), each failure a ``ConfigError`` naming the key. Pure value checks are the config's
own (``LDMConfig.check``, at load)."""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path
from typing import Any

from ldm.assemble.diffusion import build_process
from ldm.assemble.models import check_patches, init_weights
from ldm.assemble.text_encoders import text_fingerprint
from ldm.config import ConfigError, LDMConfig, load_config, resume_conflicts
from ldm.data import dataset_size, resolve_shards
from ldm.data.buckets import bucket_sizes
from ldm.data.latents import check_latent_cache, folder_hash
from ldm.data.source import train_source, val_source
from ldm.data.text_cache import check_text_cache, load_cached_null_condition
from ldm.sampling import check_sampling

AUTOENCODER_CONFIG = "config.json"
log = logging.getLogger(__name__)


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
    ae = autoencoder_config(cfg.autoencoder.path)
    factor = downsample_factor(ae)
    if cfg.data.image_size % factor:
        raise ConfigError(f"data.image_size: {cfg.data.image_size} is not divisible by the autoencoder's "
                          f"downsampling factor {factor} ({cfg.autoencoder.path})")
    check_patches(cfg.model, cfg.data.image_size // factor)
    te = cfg.text_encoder
    for key, path in [("text_encoder.path", te.path)] + [(f"text_encoder.encoders[{i}].path", e.path)
                                                         for i, e in enumerate(te.encoders or [])]:
        if path is not None and not Path(path).exists():
            raise ConfigError(f"{key}: no such file or folder {path}")
    for key, s in (("sampling", cfg.sampling), ("eval", cfg.eval)):
        if key == "eval" and not (cfg.eval.every or cfg.eval.final):
            continue
        try:
            check_sampler_settings(cfg, s.sampler, s.steps)
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
        init_weights(cfg.model.init_from, cfg.model.kind)  # names what it found instead of weights
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
        check_latent_cache_fits(cfg, cfg.data.latents, "data.latents")
    if cfg.data.text_cache is not None:
        check_text_cache_fits(cfg, src.latents)
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
    local = [u for u in urls if Path(u).is_file()]
    bad = [u for u in local if not tarfile.is_tarfile(u)]
    if local and len(bad) == len(local) == len(urls):
        raise ConfigError(f"{key}: no readable shard: {len(bad)} file(s) are not tar archives, e.g. {bad[0]}")
    if bad:
        log.warning("%s: %d of %d shards are not tar archives and will be skipped, e.g. %s", key, len(bad), len(urls),
                    bad[0])


def check_resume(cfg: LDMConfig) -> None:
    """A run resuming from checkpoints in run.output_dir does not change what their weights mean (prediction kind,
    process, UNet shape, text encoder...): ConfigError naming every such key with both values."""
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


def check_latent_cache_fits(cfg: LDMConfig, spec: str, key: str) -> None:
    """The latent cache was made by the configured autoencoder, at the configured image size."""
    try:
        info = check_latent_cache(spec, folder_hash(cfg.autoencoder.path))
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{key}: {e}") from None
    if info.get("image_size", cfg.data.image_size) != cfg.data.image_size:
        raise ConfigError(f"{key}: the cache holds latents of {info['image_size']} px images but "
                          f"data.image_size is {cfg.data.image_size}: re-encode it or set data.image_size")


def check_text_cache_fits(cfg: LDMConfig, latents: bool) -> dict[str, Any]:
    """The text cache was made by the configured text encoder (fingerprints from files: no encoder loads), holds its
    null condition, and (over latent shards) latents of the configured autoencoder; returns its ``text`` section."""
    spec = cfg.data.text_cache
    try:
        info = check_text_cache(spec, text_fingerprint(cfg.text_encoder))
        load_cached_null_condition(spec)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"data.text_cache: {e}") from None
    if info.get("max_length") not in (None, cfg.text_encoder.max_length):
        raise ConfigError(f"data.text_cache: the cache holds {info['max_length']} tokens per caption but "
                          f"text_encoder.max_length is {cfg.text_encoder.max_length}")
    if latents:
        check_latent_cache_fits(cfg, spec, "data.text_cache")
    return info


def check_buckets(cfg: LDMConfig, urls: list[str], factor: int) -> None:
    """Bucket sides divide by the autoencoder's downsampling; bucketing reads local shards by offset."""
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


def check_sampler_settings(cfg: LDMConfig, sampler: str, steps: int, spacing: str | None = None) -> None:
    """ValueError naming the problem when the model of ``cfg`` cannot be sampled with these settings
    (``ldm.sampling.check_sampling`` on the config's process and prediction)."""
    check_sampling(build_process(cfg.diffusion), cfg.diffusion.prediction, sampler, steps, spacing)
