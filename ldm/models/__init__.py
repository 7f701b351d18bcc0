"""Denoising networks: the text-conditioned latent-diffusion UNet and its size presets."""

from ldm.models.attention import Attention, SpatialTransformer, TransformerBlock
from ldm.models.presets import UNET_PRESETS, unet_preset
from ldm.models.unet import UNet, timestep_embedding

__all__ = [
    "Attention",
    "SpatialTransformer",
    "TransformerBlock",
    "UNET_PRESETS",
    "UNet",
    "timestep_embedding",
    "unet_preset",
]
