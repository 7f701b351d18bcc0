"""ldm-train-autoencoder: train the stage-1 KL autoencoder on image shards, measure its scale factor, save it frozen.

    ldm-train-autoencoder --config configs/autoencoder/emoji.yaml train.steps=500

Writes <run.output_dir>/model.safetensors + config.json (with scale_factor = 1/std of latents) and a
reconstruction grid; logs params, losses and the grid to MLflow.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from ldm.cli._common import add_config_args, load_or_exit, run_main
from ldm.config import AutoencoderConfig, save_config, to_dict

DEFAULT_CONFIG = "configs/autoencoder/emoji.yaml"


def train(cfg: AutoencoderConfig) -> dict:
    import torch

    from autoencoder import AutoencoderKL, load_pretrained, measure_scale_factor, save_pretrained, set_scale_factor
    from autoencoder import train_autoencoder
    from ldm.data import make_loader, resolve_shards
    from ldm.pipeline import make_grid
    from ldm.tracking import Tracker

    torch.manual_seed(cfg.run.seed)
    device = torch.device("cuda" if cfg.run.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.run.device == "auto" else cfg.run.device))
    out = Path(cfg.run.output_dir)
    m = cfg.model
    model = AutoencoderKL(block_out_channels=tuple(m.block_out_channels), layers_per_block=m.layers_per_block,
                          latent_channels=m.latent_channels, norm_num_groups=m.norm_num_groups,
                          mid_block_add_attention=m.mid_block_add_attention).to(device)
    train_urls = resolve_shards(cfg.data.train, "train")

    def images(split_urls, seed):
        for epoch in itertools.count():
            for batch in make_loader(split_urls, batch_size=cfg.data.batch_size, image_size=cfg.data.image_size,
                                     seed=seed + epoch, shuffle_buffer=cfg.data.shuffle_buffer,
                                     num_workers=cfg.data.num_workers, flip=cfg.data.flip, epoch=epoch):
                yield batch["image"].to(device)

    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.run.name, enabled=cfg.tracking.enabled)
    tracker.start(to_dict(cfg))
    metrics = train_autoencoder(model, images(train_urls, cfg.run.seed), steps=cfg.train.steps, lr=cfg.train.lr,
                                kl_weight=cfg.train.kl_weight, loss=cfg.train.loss, seed=cfg.run.seed,
                                log_every=cfg.train.log_every, on_log=lambda step, m: tracker.log_metrics(
                                    {f"autoencoder/{k}": v for k, v in m.items()}, step))
    model.eval()
    scale = measure_scale_factor(model, images(train_urls, cfg.run.seed + 1), max_batches=cfg.train.scale_batches)
    set_scale_factor(model, scale)
    save_pretrained(model, out)
    save_config(cfg, out.parent / f"{out.name}.config.yaml")
    model = load_pretrained(out, device=device)  # what downstream stages will see

    val_spec = cfg.data.val or cfg.data.train
    val = next(images(resolve_shards(val_spec, "val" if cfg.data.val else "train"), 0))[:16]  # (16, 3, H, W)
    with torch.no_grad():
        recon = model.decode(model.encode(val)).clamp(-1, 1)
        val_l1 = float((recon - val).abs().mean())
    grid = make_grid(torch.cat([val, recon]).add(1).div(2).cpu(), nrow=16, scale=2)
    grid_path = out.parent / f"{out.name}_reconstructions.png"
    grid.save(grid_path)
    tracker.log_metrics({"autoencoder/val_l1": val_l1, "autoencoder/scale_factor": scale}, cfg.train.steps)
    tracker.log_image(grid, "reconstructions", cfg.train.steps)
    tracker.log_artifact(out, "autoencoder")
    tracker.end()
    return {**metrics, "val_l1": val_l1, "scale_factor": scale, "folder": str(out), "grid": str(grid_path)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ldm-train-autoencoder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, DEFAULT_CONFIG)
    cfg = load_or_exit(AutoencoderConfig, parser.parse_args(argv))

    def body() -> int:
        result = train(cfg)
        print(f"autoencoder: {result['folder']} (scale factor {result['scale_factor']:.4f}, "
              f"val L1 {result['val_l1']:.4f}); reconstructions: {result['grid']}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
