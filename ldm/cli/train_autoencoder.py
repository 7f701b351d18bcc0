"""ldm-train-autoencoder: train the stage-1 KL autoencoder on image shards, measure its latent shift and scale, save it
frozen, and score it on held-out images.

    ldm-train-autoencoder --config configs/autoencoder/emoji.yaml train.steps=500

Writes <run.output_dir>/model.safetensors + config.json (with scale_factor and shift_factor: the diffusion model
sees (z - shift) * scale, zero mean and unit variance) and a reconstruction grid (held-out images above, their
reconstructions below); prints and logs to MLflow the held-out PSNR, SSIM, foreground colour error and rFID.
"""

from __future__ import annotations

import argparse

from ldm.cli._common import add_config_args, load_or_exit, run_main
from ldm.config import AutoencoderConfig

DEFAULT_CONFIG = "configs/autoencoder/emoji.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ldm-train-autoencoder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, DEFAULT_CONFIG)
    return run_main(train, load_or_exit(AutoencoderConfig, parser.parse_args(argv)))


def train(cfg: AutoencoderConfig) -> None:
    """Train, save and score the autoencoder of ``cfg``; print its held-out numbers."""
    from ldm.train.autoencoder import summary, train_stage1

    result = train_stage1(cfg)
    print(f"autoencoder: {result['folder']}: {summary(result)}; reconstructions: {result['grid']}")


if __name__ == "__main__":
    raise SystemExit(main())
