"""The exported model folder: everything sampling needs, weights as safetensors, written and read as state dicts.

    export.json                 marker: format, step, where the weights came from (an export replaces only an export)
    config.yaml                 resolved training config (UNet, process, text encoder, image size)
    unet.safetensors            raw trained weights
    unet_ema.safetensors        EMA weights (used for sampling by default)
    diffusers/                  a diffusers pipeline folder: the EMA network (unet/ or transformer/), the autoencoder
                                (vae/), and where the settings allow, the text encoders, tokenizers, scheduler/ and
                                model_index.json, so ``DiffusionPipeline.from_pretrained(export/diffusers)`` loads a
                                StableDiffusionPipeline (PixArtAlphaPipeline, StableDiffusion3Pipeline);
                                diffusers/ldm_pipeline.json (and export.json's "diffusers") says whether it reproduces
                                our sample and with which call arguments (``ldm.export.pipeline_folder``)
    sd_checkpoint.safetensors   the UNet's: one file in the CompVis / Stability layout (EMA UNet, autoencoder, a CLIP
                                text encoder) for single-file loaders (``ldm.export.single_file``)
    null_condition.safetensors  the empty-prompt embedding the model was trained with
    autoencoder/                the frozen first stage (model.safetensors + config.json with scale and shift)
    lora/                       LoRA runs: the adapters in diffusers' format (``pipe.load_lora_weights(export/lora)``
                                reads pytorch_lora_weights.safetensors, the EMA's; pytorch_lora_weights_raw is the
                                raw one); the unet files above then hold the merged weights W + (alpha / r) B A

This module knows the folder, not where weights come from: the trainer and ``ldm-export`` hand it state dicts
(``ldm.train.checkpoint.read_weights`` reads them from a checkpoint), ``ldm.assemble.load_exported`` reads it back.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm.config import ConfigError, LDMConfig, load_config, save_config
from ldm.export.single_file import write_single_file
from ldm.io import load_tensors, save_tensors, write_folder_atomically, write_json

MARKER = "export.json"
FORMAT = "ldm-export"
ENTRIES = {MARKER, "config.yaml", "unet.safetensors", "unet_ema.safetensors", "null_condition.safetensors",
           "autoencoder", "diffusers", "lora", "sd_checkpoint.safetensors"}
LORA_FILES = {"ema": "pytorch_lora_weights.safetensors", "raw": "pytorch_lora_weights_raw.safetensors"}


class ExportTargetError(ValueError):
    """The export's target exists and is not a previous export: nothing was written."""


@dataclass
class Export:
    """What an exported folder holds, read back."""

    cfg: LDMConfig
    unet: dict[str, torch.Tensor]  # the EMA (or raw) weights
    null_cond: dict[str, torch.Tensor]
    autoencoder: Path
    info: dict[str, Any]


def is_export(folder: str | Path) -> bool:
    """A folder this module wrote: it has the marker (or, from before the marker, only an export's entries)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    if (folder / MARKER).is_file():
        try:
            return json.loads((folder / MARKER).read_text()).get("format") == FORMAT
        except (OSError, ValueError):
            return False
    names = {p.name for p in folder.iterdir()}
    return "unet_ema.safetensors" in names and names <= ENTRIES


def check_target(folder: str | Path) -> None:
    """ExportTargetError unless ``folder`` is absent or a previous export (which it may replace)."""
    folder = Path(folder)
    if folder.exists() and not is_export(folder):
        kind = "a file" if not folder.is_dir() else "a folder that is not an export (no export.json)"
        raise ExportTargetError(f"{folder} exists and is {kind}: an export replaces only a previous export; "
                                "choose another --out or remove it yourself")


def save_export(folder: str | Path, cfg: LDMConfig, unet_state: dict, ema_state: dict, null_cond: dict,
                autoencoder_dir: str | Path, unet_kwargs: dict[str, Any], info: dict[str, Any] | None = None,
                adapters: dict[str, torch.nn.Module] | None = None) -> Path:
    """Write the folder atomically (built beside it, then renamed into place); replaces only a previous export.

    ``unet_kwargs`` are the UNet's constructor arguments (``ldm.assemble.unet_kwargs``), for the diffusers copy;
    ``adapters`` ("raw" and "ema" UNets with LoRA adapters) are written as diffusers LoRA files under lora/.
    """
    check_target(folder)

    def fill(tmp: Path) -> None:
        save_config(cfg, tmp / "config.yaml")
        save_tensors(unet_state, tmp / "unet.safetensors", torch.float32)
        save_tensors(ema_state, tmp / "unet_ema.safetensors", torch.float32)
        save_tensors(null_cond, tmp / "null_condition.safetensors")
        shutil.copytree(autoencoder_dir, tmp / "autoencoder")
        pipeline = _write_diffusers(tmp, cfg, ema_state, unet_kwargs)
        single = write_single_file(tmp, cfg)
        if adapters:
            from ldm.models.lora import export_diffusers_lora

            for kind, unet in adapters.items():
                export_diffusers_lora(unet, tmp / "lora" / LORA_FILES[kind])
        write_json(tmp / MARKER, {"format": FORMAT, **(info or {}), "diffusers": pipeline,
                                  **({"single_file": single} if single else {})})

    return write_folder_atomically(folder, fill)


def _write_diffusers(folder: Path, cfg: LDMConfig, ema_state: dict, unet_kwargs: dict[str, Any]) -> dict:
    """diffusers/: the EMA UNet and the autoencoder in diffusers' layout, and where the settings allow a complete
    StableDiffusionPipeline (``ldm.export.pipeline_folder``); returns what diffusers/ldm_pipeline.json records."""
    from ldm.export.pipeline_folder import write_pipeline

    return write_pipeline(folder / "diffusers", cfg, ema_state, unet_kwargs, folder / "autoencoder")


def read_export(folder: str | Path, use_ema: bool = True) -> Export:
    """Read an exported folder (config, UNet weights, null condition); FileNotFoundError/ValueError name what is wrong."""
    folder = Path(folder)
    if not (folder / "config.yaml").is_file():
        raise FileNotFoundError(f"{folder} is not an exported model folder (no config.yaml)")
    try:
        cfg = load_config(LDMConfig, folder / "config.yaml")
    except ConfigError as e:
        raise ValueError(f"{folder}/config.yaml: {e}") from None
    weights = folder / ("unet_ema.safetensors" if use_ema else "unet.safetensors")
    info = json.loads((folder / MARKER).read_text()) if (folder / MARKER).is_file() else {}
    return Export(cfg, load_tensors(weights), load_tensors(folder / "null_condition.safetensors"),
                  folder / "autoencoder", info)
