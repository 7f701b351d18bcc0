"""The exported model folder: everything sampling needs, weights as safetensors.

    config.yaml                 resolved training config (UNet, process, text encoder, image size)
    unet.safetensors            raw trained weights
    unet_ema.safetensors        EMA weights (used for sampling by default)
    null_condition.safetensors  the empty-prompt embedding the model was trained with
    autoencoder/                the frozen first stage (model.safetensors + config.json with scale factor)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ldm.config import LDMConfig, load_config, save_config


def save_export(folder: str | Path, cfg: LDMConfig, unet_state: dict, ema_state: dict, null_cond: dict,
                autoencoder_dir: str | Path) -> Path:
    """Write the folder atomically (built beside it, then renamed into place)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    save_config(cfg, tmp / "config.yaml")
    save_file({k: v.detach().cpu().float().contiguous() for k, v in unet_state.items()}, str(tmp / "unet.safetensors"))
    save_file({k: v.detach().cpu().float().contiguous() for k, v in ema_state.items()}, str(tmp / "unet_ema.safetensors"))
    save_file({k: v.detach().cpu().contiguous() for k, v in null_cond.items()}, str(tmp / "null_condition.safetensors"))
    shutil.copytree(autoencoder_dir, tmp / "autoencoder")
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    return folder


def load_pipeline(folder: str | Path, device: torch.device | str = "cpu", use_ema: bool = True):
    """Build a TextToImage pipeline from an exported folder."""
    from autoencoder import load_pretrained
    from ldm.builders import build_process, build_text_encoder, build_unet
    from ldm.pipeline import TextToImage

    folder = Path(folder)
    if not (folder / "config.yaml").exists():
        raise FileNotFoundError(f"{folder} is not an exported model folder (no config.yaml)")
    cfg = load_config(LDMConfig, folder / "config.yaml")
    autoencoder = load_pretrained(folder / "autoencoder", device=device)
    text_encoder = build_text_encoder(cfg.text_encoder, device)
    null = load_file(str(folder / "null_condition.safetensors"))
    latent_channels = autoencoder.config["latent_channels"]
    unet = build_unet(cfg.model, latent_channels, text_encoder.dim)
    weights = load_file(str(folder / ("unet_ema.safetensors" if use_ema else "unet.safetensors")))
    result = unet.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{folder}: UNet weights do not match its config: missing {result.missing_keys[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    unet = unet.to(device).eval().requires_grad_(False)
    factor = autoencoder.downsample_factor
    size = cfg.data.image_size // factor
    return TextToImage(unet, autoencoder, text_encoder, build_process(cfg.diffusion), cfg.diffusion.prediction,
                       null, (latent_channels, size, size)), cfg
