"""The exported model folder: everything sampling needs, weights as safetensors.

    config.yaml                 resolved training config (UNet, process, text encoder, image size)
    unet.safetensors            raw trained weights
    unet_ema.safetensors        EMA weights (used for sampling by default)
    diffusers/unet/, diffusers/vae/   the EMA UNet and the autoencoder in diffusers' folder layout
                                (UNet2DConditionModel / AutoencoderKL.from_pretrained load them)
    null_condition.safetensors  the empty-prompt embedding the model was trained with
    autoencoder/                the frozen first stage (model.safetensors + config.json with scale factor)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ldm.config import LDMConfig, load_config, save_config


def save_export(folder: str | Path, cfg: LDMConfig, unet_state: dict, ema_state: dict, null_cond: dict,
                autoencoder_dir: str | Path) -> Path:
    """Write the folder atomically (built beside it, then renamed into place)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    save_config(cfg, tmp / "config.yaml")
    save_file({k: v.detach().cpu().float().contiguous() for k, v in unet_state.items()}, str(tmp / "unet.safetensors"))
    save_file({k: v.detach().cpu().float().contiguous() for k, v in ema_state.items()}, str(tmp / "unet_ema.safetensors"))
    save_file({k: v.detach().cpu().contiguous() for k, v in null_cond.items()}, str(tmp / "null_condition.safetensors"))
    shutil.copytree(autoencoder_dir, tmp / "autoencoder")
    _write_diffusers(tmp, cfg, ema_state)
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    return folder


def _write_diffusers(folder: Path, cfg: LDMConfig, ema_state: dict) -> None:
    """diffusers/unet (EMA weights) and diffusers/vae beside our own files."""
    import autoencoder
    from ldm.builders import unet_kwargs
    from ldm.models import UNet, save_diffusers

    vae = autoencoder.load_pretrained(folder / "autoencoder")
    # the middle block always has cross-attention: its key projection reads the text width
    context_dim = int(next(v.shape[1] for k, v in ema_state.items() if k.endswith("attn2.to_k.weight")))
    unet = UNet(**unet_kwargs(cfg.model, vae.config["latent_channels"], context_dim))
    unet.load_state_dict({k: v.float() for k, v in ema_state.items()})
    save_diffusers(unet, folder / "diffusers" / "unet")
    autoencoder.save_diffusers(vae, folder / "diffusers" / "vae")


def checkpoint_weights(run_dir: str | Path, tag: str | None = None) -> tuple[dict, dict, str]:
    """(raw, EMA, tag) full weights from a run's checkpoint, whatever ZeRO stage and world size wrote it."""
    from ldm.train.checkpoint import Checkpointer
    from ldm.train.ema import consolidate_partitions

    root = Path(run_dir) / "checkpoints"
    tag = tag or Checkpointer(root, rank=0).latest()
    if tag is None or not (root / tag).is_dir():
        raise FileNotFoundError(f"no checkpoint {tag or 'latest'} under {root}")
    folder = root / tag
    state = torch.load(folder / "trainer_rank0.pt", weights_only=False)  # our own file
    if list(folder.glob("zero_pp_rank_*_model_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        raw = get_fp32_state_dict_from_zero_checkpoint(str(root), tag)
    else:  # ZeRO stage 0: the module state is stored whole
        raw = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    raw = {k: v.float() for k, v in raw.items()}
    ranks = [load_file(str(folder / f"ema_rank{r}.safetensors")) for r in range(state["world_size"])]
    if state["zero_stage"] == 3:
        ema = {k: consolidate_partitions([r[k] for r in ranks], raw[k].shape) for k in raw}
    else:
        ema = ranks[0]
    return raw, ema, tag


def export_checkpoint(run_dir: str | Path, out: str | Path | None = None, tag: str | None = None) -> Path:
    """Write the exported model folder from a run's checkpoint (default: latest, into <run_dir>/export)."""
    run_dir = Path(run_dir)
    cfg = load_config(LDMConfig, run_dir / "config.yaml")
    raw, ema, tag = checkpoint_weights(run_dir, tag)
    null = load_file(str(run_dir / "null_condition.safetensors"))
    return save_export(out or run_dir / "export", cfg, raw, ema, null, cfg.autoencoder.path)


def load_pipeline(folder: str | Path, device: torch.device | str = "cpu", use_ema: bool = True):
    """Build a TextToImage pipeline from an exported folder."""
    from autoencoder import load_pretrained
    from ldm.builders import build_process, build_text_encoder, build_unet
    from ldm.pipeline import TextToImage

    folder = Path(folder)
    if not (folder / "config.yaml").exists():
        raise FileNotFoundError(f"{folder} is neither an exported model folder nor a training run (no config.yaml)")
    if not (folder / "unet_ema.safetensors").exists() and (folder / "checkpoints").is_dir():
        # a training run folder: export its latest checkpoint next to it first
        folder = export_checkpoint(folder, Path(folder) / "export")
    cfg = load_config(LDMConfig, folder / "config.yaml")
    autoencoder = load_pretrained(folder / "autoencoder", device=device)
    text_encoder = build_text_encoder(cfg.text_encoder, device)
    null = load_file(str(folder / "null_condition.safetensors"))
    latent_channels = autoencoder.config["latent_channels"]
    from ldm.models import load_unet_weights

    unet = build_unet(cfg.model, latent_channels, text_encoder.dim)
    load_unet_weights(unet, folder / ("unet_ema.safetensors" if use_ema else "unet.safetensors"), layout="diffusers")
    unet = unet.to(device).eval().requires_grad_(False)
    factor = autoencoder.downsample_factor
    size = cfg.data.image_size // factor
    return TextToImage(unet, autoencoder, text_encoder, build_process(cfg.diffusion), cfg.diffusion.prediction,
                       null, (latent_channels, size, size)), cfg
