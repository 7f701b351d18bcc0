"""Config sections both stages share: the run, the data stream (and its aspect-ratio buckets), tracking."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ldm.config.schema import defining


@dataclass
class RunConfig:
    name: str = "emoji-ldm"
    output_dir: str = "runs/emoji-ldm"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class BucketConfig:
    """Aspect-ratio buckets (NovelAI 2022; SDXL, Podell et al. 2023, Sec. 2.3): resolutions of about
    data.image_size^2 pixels; each image trains at the one nearest its aspect ratio (``ldm.data.buckets``)."""

    sizes: list[list[int]] | None = None  # explicit [width, height] pairs; None: derived from data.image_size
    multiple: int = 64  # derived sides are multiples of this (and must be of the autoencoder's downsampling)
    max_ratio: float = 2.0  # derived: the widest (and tallest) aspect ratio


@dataclass
class DataConfig:
    # a folder with index.json, a folder of *.tar shards (e.g. img2dataset's output), an index.json, or a shard
    # URL pattern
    train: str = "data/emoji"
    val: str | None = "data/emoji"  # None with val_fraction > 0: the held-out part of `train`
    val_fraction: float = 0.0  # a data set without splits: hold out this fraction by a stable hash of the key
    val_seed: int = 0  # salts that hash (the keys `ldm-shards reshard --val-fraction F --seed S` holds out)
    latents: str | None = None  # pre-encoded latent shards (ldm-shards latents); used instead of `train` when set
    # cached text embeddings (ldm-shards text, over image or latent shards): streamed instead of train/latents, and
    # no text encoder is loaded for training (its null condition is stored in the cache)
    text_cache: str | None = None
    buckets: BucketConfig | None = None  # aspect-ratio buckets; None: square image_size crops
    image_size: int = defining(32)
    batch_size: int = 32  # micro-batch per process
    num_workers: int = 0
    pin_memory: bool = True  # on CUDA: batches in page-locked memory, copied to the GPU without waiting
    prefetch_factor: int = 2  # batches each loader worker prepares ahead (num_workers > 0)
    persistent_workers: bool = True  # loader workers live across epochs (num_workers > 0)
    shuffle_buffer: int = 1000
    batches_per_epoch: int | None = None  # per process; None: train split size / (batch_size x processes)
    caption: Literal["label", "label_tags"] = "label"
    flip: bool = False


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # None: sqlite store runs/mlflow.db beside the runs
    experiment: str = "emoji-ldm"
