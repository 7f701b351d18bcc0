"""The exports a run produces: the folder written at the end of training, and one from any checkpoint.

Both hand full state dicts to ``ldm.export.save_export``, which owns the folder's layout; reading a checkpoint is
``checkpoint.read_weights``'s job, which owns theirs. An export from a checkpoint may carry, as its EMA weights, the
post-hoc reconstruction of a power EMA of any relative width from the run's snapshots (``posthoc_ema``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldm.assemble import (
    Components, autoencoder_config, build_unet, downsample_factor, plain_state, state_dims, unet_kwargs,
)
from ldm.config import LDMConfig, load_config
from ldm.export import check_target, save_export
from ldm.io import load_tensors
from ldm.train.checkpoint import read_power_snapshots, read_weights
from ldm.train.power_ema import fit_error, gamma_to_sigma_rel, posthoc_coefficients, reconstruct, sigma_rel_to_gamma


def export_trained(parts: Components, out: Path, tracker, raw: dict, ema: dict, info: dict[str, Any]) -> str:
    """Rank 0 at the end of training: write <output_dir>/export, log it and register a model version."""
    cfg: LDMConfig = parts.cfg
    adapters = {"raw": parts.unet(raw), "ema": parts.unet(ema)} if cfg.model.lora is not None else None
    if adapters:  # the export holds merged full weights, and the adapters as LoRA files
        raw, ema = plain_state(adapters["raw"]), plain_state(adapters["ema"])
    folder = save_export(out / "export", cfg, raw, ema, parts.null_cond, cfg.autoencoder.path, parts.unet_kwargs(),
                         {"ema": {"kind": "ema", "decay": cfg.train.ema_decay}, **info}, adapters)
    tracker.log_artifact(folder, "export")
    version = tracker.register_model(cfg.run.name, "export")
    if version:
        print(f"registered model version models:/{cfg.run.name}/{version}")
    return str(folder)


def posthoc_ema(root: str | Path, tag: str, sigma_rel: float) -> tuple[dict, dict[str, Any]]:
    """(weights, record): the power EMA of relative width ``sigma_rel`` at checkpoint ``tag``'s step, reconstructed by
    EDM2's least-squares solve from the snapshots up to it (Karras et al. 2024, Sec. 3.2); the record (for export.json)
    names the width, its exponent, the snapshots used and how far their span misses the target profile."""
    snapshots, tag = read_power_snapshots(root, tag)
    step, gamma = int(tag.removeprefix("step")), sigma_rel_to_gamma(sigma_rel)
    profiles = [(s.gamma, float(s.step)) for s in snapshots]
    weights = reconstruct(snapshots, gamma=gamma, step=step)
    x = posthoc_coefficients(profiles, gamma, step)
    # the fit is not constrained to sum to 1: its miss scales the whole weights, so it is recorded beside the profile's
    return weights, {"kind": "power", "sigma_rel": sigma_rel, "gamma": gamma, "step": step,
                     "snapshots": len(snapshots), "snapshot_steps": sorted({s.step for s in snapshots}),
                     "tracked_sigma_rels": sorted({round(gamma_to_sigma_rel(s.gamma), 6) for s in snapshots}),
                     "profile_error": fit_error(profiles, gamma, step, x), "coefficient_sum": float(x.sum())}


def export_checkpoint(run_dir: str | Path, out: str | Path | None = None, tag: str | None = None,
                      ema_sigma_rel: float | None = None) -> Path:
    """Export a run's checkpoint (default: latest) to ``out`` (default: <run_dir>/export), from its files alone.

    With ``ema_sigma_rel`` the export's EMA weights are the post-hoc power EMA of that relative width
    (``posthoc_ema``), recorded under "ema" in export.json. The target must be absent or a previous export; it is
    checked before anything is read.
    """
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "export"
    check_target(out)
    cfg = load_config(LDMConfig, run_dir / "config.yaml")
    raw, ema, tag = read_weights(run_dir / "checkpoints", tag)
    record: dict[str, Any] = {"kind": "ema", "decay": cfg.train.ema_decay}
    if ema_sigma_rel is not None:
        ema, record = posthoc_ema(run_dir / "checkpoints", tag, ema_sigma_rel)
    null = load_tensors(run_dir / "null_condition.safetensors")
    context_dim, pooled_dim = state_dims(cfg.model, ema)  # the text widths the weights read
    ae = autoencoder_config(cfg.autoencoder.path)
    latent_channels, latent_size = int(ae["latent_channels"]), cfg.data.image_size // downsample_factor(ae)
    adapters = None
    if cfg.model.lora is not None:  # adapters over model.init_from's weights: merged for the full weights
        adapters = {k: build_unet(cfg.model, latent_channels, context_dim, pooled_dim, s, f"{tag} {k}", latent_size)
                    for k, s in (("raw", raw), ("ema", ema))}
        raw, ema = plain_state(adapters["raw"]), plain_state(adapters["ema"])
    return save_export(out, cfg, raw, ema, null, cfg.autoencoder.path,
                       unet_kwargs(cfg.model, latent_channels, context_dim, pooled_dim, latent_size),
                       {"step": int(tag.removeprefix("step")), "source": str(run_dir.resolve()), "tag": tag,
                        "ema": record}, adapters)
