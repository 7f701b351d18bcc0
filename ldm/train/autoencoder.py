"""The stage-1 run: train the KL autoencoder on image shards, measure its latent statistics (shift and scale), save it
frozen, and score it on held-out images: PSNR, SSIM, the foreground colour error and rFID (Inception-v3 FID between
the held-out images and their reconstructions), with a reconstruction grid (real above, decoded below). Everything
is logged to MLflow."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterator

import torch

from ldm.assemble import resolve_device
from ldm.config import AutoencoderConfig, ConfigError, save_config, to_dict


def _device(name: str) -> torch.device:
    """The device of ``run.device``; a ConfigError naming the key otherwise."""
    try:
        return resolve_device(name)
    except ValueError as e:
        raise ConfigError(f"run.device: {e}") from None


def check_inputs(cfg: AutoencoderConfig) -> None:
    """The shards and the output folder exist as needed, before anything trains (ConfigError naming the key)."""
    from ldm.data import resolve_shards

    for key, spec, split in (("data.train", cfg.data.train, "train"), ("data.val", cfg.data.val, "val")):
        if spec is None:
            continue
        try:
            resolve_shards(spec, split)
        except (ValueError, OSError) as e:
            raise ConfigError(f"{key}: {e}") from None
    out = Path(cfg.run.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"run.output_dir: {out} exists and is not a folder")
    _device(cfg.run.device)


def image_batches(cfg: AutoencoderConfig, split: str, seed: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Endless shuffled image batches (B, 3, H, W) in [-1, 1] of a split, one epoch after another."""
    from ldm.data import make_loader, resolve_shards

    urls = resolve_shards(cfg.data.train if split == "train" else cfg.data.val, split)
    for epoch in itertools.count():
        for batch in make_loader(urls, batch_size=cfg.data.batch_size, image_size=cfg.data.image_size,
                                 seed=seed + epoch, shuffle_buffer=cfg.data.shuffle_buffer,
                                 num_workers=cfg.data.num_workers, flip=cfg.data.flip, epoch=epoch):
            yield batch["image"].to(device)


@torch.no_grad()
def held_out_fidelity(model, cfg: AutoencoderConfig, device: torch.device, progress: bool = True) -> tuple[dict, Any]:
    """PSNR / SSIM / foreground colour error (and rFID) of the held-out split, and the reconstruction grid."""
    from autoencoder.metrics import fidelity
    from ldm.eval.realset import read_split
    from ldm.pipeline import make_grid

    e = cfg.eval
    spec, split = (cfg.data.val, "val") if cfg.data.val else (cfg.data.train, "train")
    real = read_split(spec, split, cfg.data.image_size, limit=e.images, progress=progress).floats()  # (N, 3, H, W)
    recon = torch.cat([(model.decode(model.encode(chunk.to(device) * 2 - 1)).float().cpu() + 1) / 2
                       for chunk in real.split(64)]).clamp(0, 1)
    metrics = {**fidelity(recon, real), "images": float(len(real))}
    if e.rfid:
        from ldm.eval.inception import InceptionFeatures
        from ldm.eval.metrics import fid

        inception = InceptionFeatures(e.inception, device, batch_size=64)
        metrics["rfid"] = fid(inception.features(recon, desc="inception (reconstructions)", progress=progress),
                              inception.features(real, desc="inception (held-out images)", progress=progress))
    k = min(e.grid_images, len(real))
    grid = make_grid(torch.cat([real[:k], recon[:k]]), nrow=k, scale=2)
    return metrics, grid


def train_stage1(cfg: AutoencoderConfig, progress: bool = True) -> dict[str, Any]:
    """Check the inputs, train, measure latent statistics, save frozen to run.output_dir, score on held-out data;
    returns the numbers."""
    from autoencoder import AutoencoderKL, load_pretrained, measure_latent_stats, save_pretrained, set_scale_factor
    from autoencoder import train_autoencoder
    from ldm.tracking import Tracker

    check_inputs(cfg)
    torch.manual_seed(cfg.run.seed)
    device = _device(cfg.run.device)
    out = Path(cfg.run.output_dir)
    m, t = cfg.model, cfg.train
    model = AutoencoderKL(block_out_channels=tuple(m.block_out_channels), layers_per_block=m.layers_per_block,
                          latent_channels=m.latent_channels, norm_num_groups=m.norm_num_groups,
                          mid_block_add_attention=m.mid_block_add_attention).to(device)
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.run.name, enabled=cfg.tracking.enabled)
    tracker.start(to_dict(cfg))
    status = "FAILED"
    try:
        train_metrics = train_autoencoder(
            model, image_batches(cfg, "train", cfg.run.seed, device), steps=t.steps, lr=t.lr, kl_weight=t.kl_weight,
            loss=t.loss, seed=cfg.run.seed, lr_schedule=t.lr_schedule, warmup_steps=t.warmup_steps, crop=t.crop,
            log_every=t.log_every, disc_weight=t.disc_weight, disc_start=t.disc_start, disc_layers=t.disc_layers,
            progress=progress,
            on_log=lambda step, values: tracker.log_metrics({f"autoencoder/{k}": v for k, v in values.items()}, step))
        model.eval()
        mean, std = measure_latent_stats(model, image_batches(cfg, "train", cfg.run.seed + 1, device),
                                         max_batches=t.scale_batches)
        shift, scale = (mean if t.shift else 0.0), 1.0 / std  # (z - shift) * scale: unit variance (and zero mean)
        set_scale_factor(model, scale, shift)
        save_pretrained(model, out)
        save_config(cfg, out.parent / f"{out.name}.config.yaml")
        model = load_pretrained(out, device=device)  # what downstream stages will see
        fidelity, grid = held_out_fidelity(model, cfg, device, progress)
        grid_path = out.parent / f"{out.name}_reconstructions.png"
        grid.save(grid_path)
        metrics = {**{f"autoencoder/val_{k}": v for k, v in fidelity.items()}, "autoencoder/scale_factor": scale,
                   "autoencoder/shift_factor": shift, "autoencoder/latent_mean": mean, "autoencoder/latent_std": std}
        tracker.log_metrics(metrics, t.steps)
        tracker.log_image(grid, "reconstructions", t.steps)
        tracker.log_artifact(out, "autoencoder")
        status = "FINISHED"
    finally:
        tracker.end(status)
    return {**train_metrics, **{f"val_{k}": v for k, v in fidelity.items()}, "scale_factor": scale,
            "shift_factor": shift, "folder": str(out), "grid": str(grid_path), "run_id": tracker.run_id}


def summary(result: dict[str, Any]) -> str:
    """One line: the held-out fidelity of a stage-1 run."""
    text = (f"held-out PSNR {result['val_psnr']:.2f} dB, SSIM {result['val_ssim']:.4f}, foreground colour error "
            f"{result['val_fg_colour_error']:.1f}/255")
    if "val_rfid" in result:
        text += f", rFID {result['val_rfid']:.2f}"
    return text + f" over {int(result['val_images'])} images (scale {result['scale_factor']:.4f}, " \
                  f"shift {result['shift_factor']:.4f})"
