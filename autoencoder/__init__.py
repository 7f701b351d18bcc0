"""First stage of latent diffusion: the KL autoencoder, its loss, training, I/O and latent scaling."""

from autoencoder.io import (
    load_diffusers,
    load_pretrained,
    measure_scale_factor,
    save_pretrained,
    set_scale_factor,
)
from autoencoder.loss import autoencoder_loss
from autoencoder.model import AutoencoderKL, DiagonalGaussian
from autoencoder.train import train_autoencoder

__all__ = [
    "AutoencoderKL",
    "DiagonalGaussian",
    "autoencoder_loss",
    "load_diffusers",
    "load_pretrained",
    "measure_scale_factor",
    "save_pretrained",
    "set_scale_factor",
    "train_autoencoder",
]
