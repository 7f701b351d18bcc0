"""Denoising networks: the text-conditioned latent-diffusion UNet (SD and SDXL shapes), PixArt-alpha's DiT and SD3's
MMDiT, their size presets, weight I/O in diffusers' and CompVis' layouts."""

from ldm.models.attention import Attention, SpatialTransformer, TransformerBlock
from ldm.models.convert import compvis_to_diffusers, diffusers_to_compvis
from ldm.models.dit import DiT
from ldm.models.embeddings import timestep_embedding
from ldm.models.io import (
    load_diffusers_model,
    load_diffusers_unet,
    load_model_weights,
    load_unet_weights,
    save_diffusers,
)
from ldm.models.mmdit import MMDiT
from ldm.models.presets import DIT_PRESETS, MMDIT_PRESETS, PRESETS, UNET_PRESETS, model_preset, unet_preset
from ldm.models.unet import UNet, micro_conditioned

NETWORKS = {"unet": UNet, "dit": DiT, "mmdit": MMDiT}  # model.kind -> the network

__all__ = [
    "Attention",
    "DIT_PRESETS",
    "DiT",
    "MMDIT_PRESETS",
    "NETWORKS",
    "MMDiT",
    "PRESETS",
    "SpatialTransformer",
    "TransformerBlock",
    "UNET_PRESETS",
    "UNet",
    "compvis_to_diffusers",
    "diffusers_to_compvis",
    "load_diffusers_model",
    "load_diffusers_unet",
    "load_model_weights",
    "load_unet_weights",
    "micro_conditioned",
    "model_preset",
    "save_diffusers",
    "timestep_embedding",
    "unet_preset",
]
