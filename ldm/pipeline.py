"""Text-to-image: prompt -> text encoder -> classifier-free-guided sampler over latents -> autoencoder decode."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from tqdm import tqdm

from ldm.conditioning import Cond, expand_cond, micro_conditions
from ldm.diffusion import GaussianProcess, Predictor
from ldm.models import micro_conditioned
from ldm.sampling import Guided, guide, sample

Tensor = torch.Tensor


def unet_denoiser(unet: torch.nn.Module):
    """Adapt a UNet (x, t, context, context_mask, pooled, time_ids) to the denoiser interface (x_t, t, cond); the
    pooled text vector and SDXL's size/crop ids pass when the condition has them (time_ids stay float32)."""
    dtype = next(unet.parameters()).dtype

    def denoiser(x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        extra = {k: cond[k] for k in ("pooled", "time_ids") if k in cond}
        if "pooled" in extra:
            extra["pooled"] = extra["pooled"].to(dtype)
        out = unet(x.to(dtype), t, cond["context"].to(dtype), cond.get("context_mask"), **extra)
        return out.float()

    return denoiser


class TextToImage:
    """Sample images for prompts with a trained UNet, its frozen autoencoder and text encoder."""

    def __init__(self, unet, autoencoder, text_encoder, process: GaussianProcess, prediction: str,
                 null_cond: Cond, latent_shape: tuple[int, int, int], denoiser=None, defaults: dict | None = None):
        """``denoiser``: what the network is sampled as (default: its plain output; e.g. EDM-preconditioned);
        ``defaults``: sampling options used when a call does not give them (guidance_rescale, guidance_interval,
        time_shift). ``latent_shape`` is the default size; a call may ask for any height and width."""
        self.unet, self.autoencoder, self.text_encoder = unet, autoencoder, text_encoder
        self.process, self.prediction = process, prediction
        self.null_cond, self.latent_shape = null_cond, tuple(latent_shape)
        self.denoiser = denoiser if denoiser is not None else unet_denoiser(unet)
        self.defaults = dict(defaults or {})
        self.factor = int(getattr(autoencoder, "downsample_factor", 8))
        # size/crop micro-conditioning (SDXL's UNet, PixArt's 1024-px DiT): (original size, crop corner, target size)
        self.micro_conditioned = bool(getattr(unet, "micro_conditioned", False))

    @property
    def image_size(self) -> tuple[int, int]:
        """The default (height, width) in pixels."""
        return self.latent_shape[1] * self.factor, self.latent_shape[2] * self.factor

    def check_size(self, height: int, width: int) -> None:
        """ValueError unless the autoencoder's downsampling divides both sides."""
        if height < 1 or width < 1 or height % self.factor or width % self.factor:
            raise ValueError(f"height and width must be positive multiples of the autoencoder's downsampling factor "
                             f"{self.factor}, got {height} x {width}")

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], *, seeds: Sequence[int], negative_prompt: str = "",
                 sampler: str = "ddpm", steps: int = 50, guidance: float = 4.0, guidance_rescale: float | None = None,
                 guidance_interval: Sequence[float] | None = None, time_shift: float | None = None,
                 height: int | None = None, width: int | None = None, original_size: Sequence[int] | None = None,
                 crop_top_left: Sequence[int] = (0, 0), target_size: Sequence[int] | None = None,
                 **options) -> Tensor:
        """Images (B, 3, H, W) in [0, 1]; image i depends only on (prompt i, seed i) and the settings.

        Classifier-free guidance with scale ``guidance``, rescaled by phi = ``guidance_rescale`` (Lin et al. 2023) and
        applied only inside ``guidance_interval`` = (sigma_lo, sigma_hi) when given (Kynkaanniemi et al. 2024);
        ``time_shift`` warps the time grid (SD3). Options not given take the model's configured defaults.
        ``height`` x ``width`` (default: the trained image size) is the image size; a micro-conditioned (SDXL) model
        is also told ``original_size`` and ``target_size`` (h, w; default: the image size) and ``crop_top_left``
        (top, left; default (0, 0): uncropped), both guidance halves alike, as SDXL's pipelines do."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if not math.isfinite(guidance):
            raise ValueError(f"guidance must be a finite number, got {guidance}")
        H, W = height or self.image_size[0], width or self.image_size[1]
        self.check_size(H, W)
        B, device = len(prompts), self.device
        cond = self.text_encoder(list(prompts))
        uncond = self.text_encoder([negative_prompt] * B) if negative_prompt else expand_cond(self.null_cond, B)
        cond, uncond = _to(cond, device), _to(uncond, device)
        if self.micro_conditioned:
            ids = micro_conditions(original_size or (H, W), crop_top_left, target_size or (H, W), B).to(device)
            cond, uncond = {**cond, "time_ids": ids}, {**uncond, "time_ids": ids}  # (B, 6)
        rescale = self.defaults.get("guidance_rescale", 0.0) if guidance_rescale is None else guidance_rescale
        interval = self.defaults.get("guidance_interval") if guidance_interval is None else guidance_interval
        shift = self.defaults.get("time_shift", 1.0) if time_shift is None else time_shift
        denoiser = guide(self.denoiser, guidance, rescale=rescale, interval=interval, process=self.process)
        model = Predictor(denoiser, self.process, self.prediction)
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        shape = (B, self.latent_shape[0], H // self.factor, W // self.factor)  # (B, C, h, w)
        z = sample(model, shape, sampler=sampler, steps=steps, cond=Guided(cond, uncond),
                   generator=generators, device=device, time_shift=shift, **options)  # (B, C, h, w)
        images = self.autoencoder.decode(z.to(next(self.autoencoder.parameters()).dtype)).float()  # (B, 3, H, W)
        return ((images + 1) / 2).clamp(0, 1)


    def generate(self, prompts: Sequence[str], seeds: Sequence[int], *, batch_size: int = 32, progress: bool = True,
                 desc: str = "sampling", **settings) -> Tensor:
        """Images (N, 3, H, W) in [0, 1] on the CPU for any number of prompts, ``batch_size`` at a time.

        Image i depends only on (prompt i, seed i) and the settings, so the batch size never changes a result.
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        out = []
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", disable=not progress,
                          leave=False):
            chunk = slice(start, start + batch_size)
            out.append(self(list(prompts[chunk]), seeds=list(seeds[chunk]), **settings).cpu())
        return torch.cat(out)


def write_samples(pipe: TextToImage, prompts: Sequence[str], seeds: Sequence[int], out: str | Path, *,
                  record: dict, nrow: int, batch_size: int = 32, negative_prompt: str = "", **settings) -> Path:
    """Generate image i for (prompt i, seed i) with ``settings``; write it as ``<out>/NNNNN.png`` with its prompt,
    negative prompt, seed and ``record`` (what made it: sampler, guidance, model...) as PNG text metadata, each key
    and all of them as JSON under ``parameters``; then ``<out>/grid.png``, ``nrow`` images a row. Returns the grid."""
    from PIL.PngImagePlugin import PngInfo

    images = pipe.generate(prompts, seeds, batch_size=batch_size, negative_prompt=negative_prompt, **settings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(to_pil(images)):
        info = PngInfo()
        meta = {"prompt": prompts[i], "negative_prompt": negative_prompt, "seed": seeds[i], **record}
        for k, v in meta.items():
            info.add_text(k, str(v))
        info.add_text("parameters", json.dumps(meta))
        im.save(out / f"{i:05d}.png", pnginfo=info)
    make_grid(images, nrow=nrow, scale=2).save(out / "grid.png")
    return out / "grid.png"


def _to(cond: Cond, device) -> Cond:
    return {k: v.to(device) for k, v in cond.items()}


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL images."""
    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")  # (B, H, W, 3)
    return [Image.fromarray(a) for a in arr]


def make_grid(images: Tensor, nrow: int | None = None, pad: int = 2, scale: int = 1) -> Image.Image:
    """Tile (B, 3, H, W) images in [0, 1] into one white-padded PIL grid, row-major, nrow per row."""
    B, _, H, W = images.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    rows = math.ceil(B / nrow)
    grid = Image.new("RGB", (nrow * (W + pad) + pad, rows * (H + pad) + pad), "white")
    for i, im in enumerate(to_pil(images)):
        grid.paste(im, (pad + (i % nrow) * (W + pad), pad + (i // nrow) * (H + pad)))
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    return grid
