"""First stage of latent diffusion: the KL autoencoder, its loss, training, I/O and latent scaling."""

from autoencoder.io import (
    SD_VAE_CONFIG,
    load_compvis,
    load_diffusers,
    load_pretrained,
    load_weights,
    measure_latent_stats,
    measure_scale_factor,
    read_state_dict,
    save_diffusers,
    save_pretrained,
    set_scale_factor,
)
from autoencoder.loss import autoencoder_loss
from autoencoder.model import AutoencoderKL, DiagonalGaussian
from autoencoder.train import train_autoencoder

__all__ = [
    "SD_VAE_CONFIG",
    "AutoencoderKL",
    "DiagonalGaussian",
    "autoencoder_loss",
    "load_compvis",
    "load_diffusers",
    "load_pretrained",
    "load_weights",
    "measure_latent_stats",
    "measure_scale_factor",
    "read_state_dict",
    "save_diffusers",
    "save_pretrained",
    "set_scale_factor",
    "train_autoencoder",
]
