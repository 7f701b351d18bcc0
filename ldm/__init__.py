"""Distributed latent-diffusion training: diffusion math, samplers, models, data, DeepSpeed training, MLflow tracking."""

__version__ = "0.1.0"
