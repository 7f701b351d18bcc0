"""Denoising networks: the text-conditioned latent-diffusion UNet (SD and SDXL shapes), its size presets, weight I/O."""

from ldm.models.attention import Attention, SpatialTransformer, TransformerBlock
from ldm.models.convert import compvis_to_diffusers, diffusers_to_compvis
from ldm.models.embeddings import timestep_embedding
from ldm.models.io import load_diffusers_unet, load_unet_weights, save_diffusers
from ldm.models.presets import UNET_PRESETS, unet_preset
from ldm.models.unet import UNet, micro_conditioned

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
    "micro_conditioned",
    "save_diffusers",
    "timestep_embedding",
    "unet_preset",
]
