"""An export's single-file checkpoint in the CompVis / Stability layout (``sd_checkpoint.safetensors``), what tools
that load one Stable Diffusion file read (diffusers' ``from_single_file``, the CompVis ``ldm`` code):

    model.diffusion_model.*             the EMA UNet (``ldm.models.convert.diffusers_to_compvis``)
    first_stage_model.*                 the autoencoder as in diffusers/vae/ (latent shift folded in)
    cond_stage_model.transformer.*      the CLIP text encoder, when it is one (SD 1.x's layout); any other encoder
                                        (the MiniLM default) stays in diffusers/text_encoder/ and is passed alongside

Written for the UNet only (DiT and MMDiT checkpoints have no CompVis layout), from the diffusers folder the export
has just written, so the two hold the same tensors. The file carries no config: a loader takes the shapes from
diffusers/ (``from_single_file(path, config=export/diffusers)``) or infers them from the keys.
"""

from __future__ import annotations

from pathlib import Path

from ldm.io import load_tensors, save_tensors

FILE = "sd_checkpoint.safetensors"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def write_single_file(export: Path, cfg) -> dict | None:
    """Write ``export/sd_checkpoint.safetensors`` from ``export/diffusers``; returns what export.json records about it
    (None: not written, the network is not a UNet)."""
    from autoencoder.convert import diffusers_to_compvis as vae_to_compvis
    from ldm.models.convert import COMPVIS_PREFIX, diffusers_to_compvis

    if cfg.model.kind != "unet":
        return None
    folder = export / "diffusers"
    state = diffusers_to_compvis(load_tensors(folder / "unet" / WEIGHTS), COMPVIS_PREFIX)
    state.update(vae_to_compvis(load_tensors(folder / "vae" / WEIGHTS), "first_stage_model."))
    clip = cfg.text_encoder.kind == "clip" and (folder / "text_encoder" / "model.safetensors").is_file()
    if clip:
        # SD 1.x's names are transformers' CLIPTextModel of before 5.6, under text_model. (5.6 dropped that level)
        state.update({f"cond_stage_model.transformer.{k if k.startswith('text_model.') else 'text_model.' + k}": v
                      for k, v in load_tensors(folder / "text_encoder" / "model.safetensors").items()})
    save_tensors(state, export / FILE)
    return {"file": FILE, "layout": "compvis",
            "text_encoder": "cond_stage_model.transformer (CLIP)" if clip else
            "not in the file: pass diffusers/text_encoder and diffusers/tokenizer to the loader"}
