"""Saving, loading and latent scaling of the KL autoencoder.

A saved autoencoder is a folder with `model.safetensors` (weights) and `config.json`
(constructor arguments, including scale_factor and shift_factor, plus a format tag). Folders written
by diffusers' `AutoencoderKL.save_pretrained` load through `load_diffusers` and `save_diffusers`
writes one; CompVis/Stability checkpoints (a whole SD `.ckpt`/`.safetensors` or a stage-1 file) load
through `load_compvis` / `load_weights` (key conversion in `autoencoder.convert`). Weights are read
with safetensors or `torch.load(weights_only=True)`, so loading never runs pickled code.

The scale factor follows Rombach et al. 2022 (the `scale_by_std` option of their code): 1 / std of
the latents over some data, so the diffusion model sees latents of roughly unit variance. LDM
estimates it on one batch; `measure_scale_factor` pools up to `max_batches` batches.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from autoencoder.convert import COMPVIS_PREFIXES, compvis_to_diffusers, compvis_vae_subdict, diffusers_to_compvis
from autoencoder.model import AutoencoderKL
from ldm.io import check_state_dict, load_tensors, read_state_dict, save_tensors, write_folder_atomically, write_json

# Stable Diffusion 1.x/2.x's KL-f8 autoencoder (its CompVis checkpoints carry no config).
SD_VAE_CONFIG: dict[str, Any] = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                     norm_num_groups=32, scale_factor=0.18215)
FORMAT_TAG = "ldm-autoencoder-kl"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def save_pretrained(model: AutoencoderKL, folder: str | os.PathLike) -> Path:
    """Write weights + config into `folder` atomically (see write_folder_atomically)."""

    def fill(tmp: Path) -> None:
        save_tensors(model.state_dict(), tmp / WEIGHTS_NAME)
        write_json(tmp / CONFIG_NAME, {"format": FORMAT_TAG, **model.config})

    return write_folder_atomically(folder, fill)


def save_diffusers(model: AutoencoderKL, folder: str | os.PathLike) -> Path:
    """Write a folder that diffusers' AutoencoderKL.from_pretrained (and load_diffusers) loads."""

    def fill(tmp: Path) -> None:
        save_tensors(model.state_dict(), tmp / DIFFUSERS_WEIGHTS_NAME)
        write_json(tmp / CONFIG_NAME, {"_class_name": "AutoencoderKL", **model.to_diffusers_config()})

    return write_folder_atomically(folder, fill)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME}; not a saved autoencoder folder")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_weights(
    model: AutoencoderKL, source: str | os.PathLike | Mapping[str, torch.Tensor], layout: str = "auto"
) -> AutoencoderKL:
    """Load a checkpoint (file or state dict) in our/diffusers or CompVis layout into `model`, all keys checked.

    CompVis sources may be a whole Stable Diffusion checkpoint (first_stage_model.* is used) or a bare
    stage-1 file (its training-loss loss.* entries are ignored). Mismatches are reported in the
    checkpoint's own key names.
    """
    name = "<state dict>" if isinstance(source, Mapping) else str(source)
    prefixes = () if layout == "diffusers" else COMPVIS_PREFIXES
    state = dict(source) if isinstance(source, Mapping) else read_state_dict(source, prefixes)
    if layout == "auto":
        layout = "compvis" if any(".down.0." in k or k.startswith(COMPVIS_PREFIXES) for k in state) else "diffusers"
    if layout == "compvis":
        state = compvis_vae_subdict(state)
        check_state_dict(diffusers_to_compvis(model.state_dict()), state, name)
        state = compvis_to_diffusers(state)
    elif layout != "diffusers":
        raise ValueError(f"layout must be 'auto', 'diffusers' or 'compvis', got {layout!r}")
    check_state_dict(model, state, name)
    model.load_state_dict(state, strict=True)
    return model


def load_compvis(
    source: str | os.PathLike | Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> AutoencoderKL:
    """A frozen AutoencoderKL from a CompVis checkpoint; config defaults to Stable Diffusion's VAE."""
    model = AutoencoderKL(**(SD_VAE_CONFIG if config is None else config))
    return freeze(load_weights(model, source, layout="compvis").to(device))


def _build(config: Mapping[str, Any], folder: Path) -> AutoencoderKL:
    try:
        return AutoencoderKL(**config)
    except TypeError as err:  # unknown or missing constructor argument
        raise ValueError(f"{folder}: bad autoencoder config: {err}") from err


def _load_frozen(model: AutoencoderKL, weights: Path, device: str | torch.device) -> AutoencoderKL:
    if not weights.is_file():
        raise FileNotFoundError(f"{weights.parent}: missing weights file {weights.name}")
    state = load_tensors(weights)  # safetensors: plain tensors, no code
    check_state_dict(model, state, str(weights.parent))
    model.load_state_dict(state, strict=True)
    return freeze(model.to(device))


def freeze(model: AutoencoderKL) -> AutoencoderKL:
    """Eval mode with requires_grad off: the frozen first stage of latent diffusion."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_pretrained(folder: str | os.PathLike, device: str | torch.device = "cpu") -> AutoencoderKL:
    """Load a folder written by `save_pretrained` as a frozen model (eval, requires_grad False)."""
    folder = Path(folder)
    config = _read_config(folder)
    tag = config.pop("format", None)
    if tag != FORMAT_TAG:
        raise ValueError(f"{folder}: config format is {tag!r}, expected {FORMAT_TAG!r}")
    return _load_frozen(_build(config, folder), folder / WEIGHTS_NAME, device)


def load_diffusers(folder: str | os.PathLike, device: str | torch.device = "cpu") -> AutoencoderKL:
    """Load a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors), frozen."""
    folder = Path(folder)
    cfg = _read_config(folder)
    if cfg.get("_class_name") != "AutoencoderKL":
        raise ValueError(f"{folder}: _class_name is {cfg.get('_class_name')!r}, expected 'AutoencoderKL'")
    blocks = list(cfg.get("block_out_channels", (64,)))
    checks = {
        "down_block_types": (list(cfg.get("down_block_types", ())), ["DownEncoderBlock2D"] * len(blocks)),
        "up_block_types": (list(cfg.get("up_block_types", ())), ["UpDecoderBlock2D"] * len(blocks)),
        "act_fn": (cfg.get("act_fn", "silu"), "silu"),
        "latents_mean": (cfg.get("latents_mean"), None),  # per-channel scaling is not supported
    }
    for key, (got, want) in checks.items():
        if got != want:
            raise ValueError(f"{folder}: unsupported {key}={got!r} (expected {want!r})")
    config = {
        "in_channels": cfg.get("in_channels", 3),
        "out_channels": cfg.get("out_channels", 3),
        "latent_channels": cfg.get("latent_channels", 4),
        "block_out_channels": blocks,
        "layers_per_block": cfg.get("layers_per_block", 1),
        "norm_num_groups": cfg.get("norm_num_groups", 32),
        "mid_block_add_attention": cfg.get("mid_block_add_attention", True),
        "use_quant_conv": cfg.get("use_quant_conv", True),
        "use_post_quant_conv": cfg.get("use_post_quant_conv", True),
        "scale_factor": cfg.get("scaling_factor") or 0.18215,
        "shift_factor": cfg.get("shift_factor") or 0.0,
    }
    return _load_frozen(_build(config, folder), folder / DIFFUSERS_WEIGHTS_NAME, device)


@torch.no_grad()
def measure_latent_stats(
    model: AutoencoderKL, images_iterable: Iterable[torch.Tensor], max_batches: int = 16
) -> tuple[float, float]:
    """(mean, std) of the raw latent modes over up to `max_batches` image batches, pooled over every value.

    The diffusion-space latent (z - shift) * scale with shift = mean and scale = 1 / std has zero mean and unit
    variance on that data: diffusers' ``shift_factor`` / ``scaling_factor`` convention (SD3, Flux), LDM's
    ``scale_by_std`` when the shift is left at 0.
    """
    if max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, total_sq, count = 0.0, 0.0, 0
    try:
        for images in itertools.islice(images_iterable, max_batches):  # never pulls an extra batch
            z = model.encode_dist(images.to(device)).mode().double()  # (B, C, h, w)
            total += z.sum().item()
            total_sq += z.pow(2).sum().item()
            count += z.numel()
    finally:
        model.train(was_training)
    if count < 2:
        raise ValueError("measuring latent statistics needs at least two latent values; the image iterable was empty")
    mean = total / count
    variance = (total_sq - total * total / count) / (count - 1)
    if variance <= 0.0:
        raise ValueError("latents have zero variance; cannot derive a scale factor")
    return mean, variance**0.5


def measure_scale_factor(
    model: AutoencoderKL, images_iterable: Iterable[torch.Tensor], max_batches: int = 16
) -> float:
    """1 / std of the raw latent modes over up to `max_batches` image batches (LDM's scale factor)."""
    return 1.0 / measure_latent_stats(model, images_iterable, max_batches)[1]


def set_scale_factor(
    model: AutoencoderKL, scale_factor: float, shift_factor: float | None = None
) -> AutoencoderKL:
    """Set the latent scaling used by `encode`/`decode` (saved with the model by `save_pretrained`)."""
    if not scale_factor or scale_factor != scale_factor:  # zero or NaN
        raise ValueError(f"scale_factor must be a non-zero number, got {scale_factor}")
    model.scale_factor = float(scale_factor)
    if shift_factor is not None:
        model.shift_factor = float(shift_factor)
    return model
