"""The exports a run produces: the folder written at the end of training, and one from any checkpoint.

Both hand full state dicts to ``ldm.export.save_export``, which owns the folder's layout; reading a checkpoint is
``checkpoint.read_weights``'s job, which owns theirs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldm.assemble import Components, autoencoder_config, unet_kwargs
from ldm.config import LDMConfig, load_config
from ldm.export import check_target, save_export
from ldm.io import load_tensors
from ldm.train.checkpoint import read_weights


def export_trained(parts: Components, out: Path, tracker, raw: dict, ema: dict, info: dict[str, Any]) -> str:
    """Rank 0 at the end of training: write <output_dir>/export, log it and register a model version."""
    cfg: LDMConfig = parts.cfg
    folder = save_export(out / "export", cfg, raw, ema, parts.null_cond, cfg.autoencoder.path,
                         unet_kwargs(cfg.model, parts.latent_shape[0], parts.context_dim), info)
    tracker.log_artifact(folder, "export")
    version = tracker.register_model(cfg.run.name, "export")
    if version:
        print(f"registered model version models:/{cfg.run.name}/{version}")
    return str(folder)


def export_checkpoint(run_dir: str | Path, out: str | Path | None = None, tag: str | None = None) -> Path:
    """Export a run's checkpoint (default: latest) to ``out`` (default: <run_dir>/export), from its files alone.

    The target must be absent or a previous export; it is checked before anything is read.
    """
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "export"
    check_target(out)
    cfg = load_config(LDMConfig, run_dir / "config.yaml")
    raw, ema, tag = read_weights(run_dir / "checkpoints", tag)
    null = load_tensors(run_dir / "null_condition.safetensors")
    # the middle block always has cross-attention: its key projection reads the text width
    context_dim = int(next(v.shape[1] for k, v in ema.items() if k.endswith("attn2.to_k.weight")))
    latent_channels = int(autoencoder_config(cfg.autoencoder.path)["latent_channels"])
    return save_export(out, cfg, raw, ema, null, cfg.autoencoder.path,
                       unet_kwargs(cfg.model, latent_channels, context_dim),
                       {"step": int(tag.removeprefix("step")), "source": str(run_dir.resolve()), "tag": tag})
