"""Denoising networks: the text-conditioned latent-diffusion UNet, its size presets, and weight I/O."""

from ldm.models.attention import Attention, SpatialTransformer, TransformerBlock
from ldm.models.convert import compvis_to_diffusers, diffusers_to_compvis
from ldm.models.io import load_diffusers_unet, load_unet_weights, save_diffusers
from ldm.models.presets import UNET_PRESETS, unet_preset
from ldm.models.unet import UNet, timestep_embedding

__all__ = [
    "Attention",
    "SpatialTransformer",
    "TransformerBlock",
    "UNET_PRESETS",
    "UNet",
    "compvis_to_diffusers",
    "diffusers_to_compvis",
    "load_diffusers_unet",
    "load_unet_weights",
    "save_diffusers",
    "timestep_embedding",
    "unet_preset",
]
