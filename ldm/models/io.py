"""Loading denoiser weights from other projects' files, and exporting to the diffusers layout.

* ``load_unet_weights(unet, source)``: a diffusers/our state dict or a CompVis/Stability one (a whole
  Stable Diffusion ``.ckpt``/``.safetensors`` with ``model.diffusion_model.*``, optionally its EMA
  copy, or the bare UNet dict). Every key and shape is checked first; a mismatch raises one error
  that lists the missing, unexpected and mis-shaped keys in the checkpoint's own naming.
* ``load_model_weights(model, source)``: the same for any backbone in the diffusers layout (UNet, DiT, MMDiT); the
  position table diffusers stores for SD3 (``pos_embed.pos_embed``) is checked against the computed one, not loaded.
* ``save_diffusers`` / ``load_diffusers_model``: a folder with ``config.json`` and
  ``diffusion_pytorch_model.safetensors`` that diffusers' ``UNet2DConditionModel``, ``PixArtTransformer2DModel`` or
  ``SD3Transformer2DModel.from_pretrained`` reads (``load_diffusers_unet``: the same, a UNet only).

Files are read with safetensors or ``torch.load(weights_only=True)``; nothing else is unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from ldm.io import check_state_dict, read_state_dict, save_tensors, write_folder_atomically
from ldm.models.convert import (
    COMPVIS_PREFIX,
    EMA_PREFIX,
    compvis_to_diffusers,
    compvis_unet_subdict,
    detect_layout,
    diffusers_to_compvis,
)
from ldm.models.dit import DiT
from ldm.models.mmdit import MMDiT
from ldm.models.unet import UNet

DIFFUSERS_CLASSES: dict[str, type[torch.nn.Module]] = {
    "UNet2DConditionModel": UNet, "PixArtTransformer2DModel": DiT, "SD3Transformer2DModel": MMDiT}
STORED_BUFFERS = ("pos_embed.pos_embed",)  # in diffusers' SD3 state dicts; computed here
CONFIG_NAME = "config.json"
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
Source = str | os.PathLike | Mapping[str, torch.Tensor]


def load_unet_weights(unet: UNet, source: Source, layout: str = "auto", ema: bool = False) -> UNet:
    """Load a checkpoint (file or state dict; layout 'auto', 'diffusers' or 'compvis') into unet, strictly."""
    name = "<state dict>" if isinstance(source, Mapping) else str(source)
    prefixes = () if layout == "diffusers" else (COMPVIS_PREFIX, EMA_PREFIX) if ema else (COMPVIS_PREFIX,)
    state = dict(source) if isinstance(source, Mapping) else read_state_dict(source, prefixes)
    layout = detect_layout(state) if layout == "auto" else layout
    if layout == "compvis":
        state = compvis_unet_subdict(state, ema)
        check_state_dict(diffusers_to_compvis(unet.state_dict()), state, name)  # in CompVis names
        state = compvis_to_diffusers(state)
    elif layout != "diffusers":
        raise ValueError(f"layout must be 'auto', 'diffusers' or 'compvis', got {layout!r}")
    elif ema:
        raise ValueError("ema=True applies to CompVis checkpoints (their model_ema.* copy) only")
    check_state_dict(unet, state, name)
    unet.load_state_dict(state, strict=True)
    return unet


def load_model_weights(model: torch.nn.Module, source: Source) -> torch.nn.Module:
    """Load diffusers-layout weights (file or state dict) into a UNet, DiT or MMDiT strictly; one error lists every
    missing, unexpected and mis-shaped key."""
    if isinstance(model, UNet):
        return load_unet_weights(model, source, layout="diffusers")
    name = "<state dict>" if isinstance(source, Mapping) else str(source)
    state = dict(source) if isinstance(source, Mapping) else read_state_dict(source)
    check_state_dict(model, {k: v for k, v in state.items() if k not in STORED_BUFFERS}, name)
    model.load_state_dict(state, strict=True)  # PatchEmbed checks a stored SD3 position table
    return model


def diffusers_class(model: torch.nn.Module) -> str:
    """The diffusers class whose folder layout and state dict the model has."""
    for name, cls in DIFFUSERS_CLASSES.items():
        if isinstance(model, cls):
            return name
    raise TypeError(f"{type(model).__name__} has no diffusers counterpart (UNet, DiT or MMDiT)")


def save_diffusers(model: torch.nn.Module, folder: str | os.PathLike,
                   state_dict: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write a UNet, DiT or MMDiT (its config, and its weights or the given state_dict) as a diffusers model folder
    (UNet2DConditionModel, PixArtTransformer2DModel, SD3Transformer2DModel), atomically."""
    kind = diffusers_class(model)

    def fill(tmp: Path) -> None:
        state = dict(model.state_dict() if state_dict is None else state_dict)
        if isinstance(model, MMDiT):
            state = model.diffusers_state_dict(state)
        save_tensors(state, tmp / DIFFUSERS_WEIGHTS_NAME)
        config = {"_class_name": kind, **model.to_diffusers_config()}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    return write_folder_atomically(folder, fill)


def load_diffusers_model(folder: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Build and load a UNet, DiT or MMDiT from a diffusers model folder (``_class_name`` in its config.json)."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME}; not a diffusers model folder")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    kind = config.get("_class_name", "UNet2DConditionModel")
    if kind not in DIFFUSERS_CLASSES:
        raise ValueError(f"{folder}: _class_name is {kind!r}, expected one of {sorted(DIFFUSERS_CLASSES)}")
    model = DIFFUSERS_CLASSES[kind].from_diffusers_config({k: v for k, v in config.items() if not k.startswith("_")})
    weights = folder / DIFFUSERS_WEIGHTS_NAME
    if not weights.is_file():
        weights = folder / "diffusion_pytorch_model.bin"
    return load_model_weights(model, weights).to(device)


def load_diffusers_unet(folder: str | os.PathLike, device: str | torch.device = "cpu") -> UNet:
    """Build and load a UNet from a diffusers UNet2DConditionModel folder (e.g. an SD ``unet/`` folder)."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if config_path.is_file():
        kind = json.loads(config_path.read_text(encoding="utf-8")).get("_class_name", "UNet2DConditionModel")
        if kind != "UNet2DConditionModel":
            raise ValueError(f"{folder}: _class_name is {kind!r}, expected 'UNet2DConditionModel'")
    return load_diffusers_model(folder, device)
