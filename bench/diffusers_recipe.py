"""The peer: diffusers' text-to-image training recipe, as its ``examples/text_to_image/train_text_to_image.py`` does
it, on our cached latents and text embeddings, for the side-by-side of ``bench_recipe``.

Their ``UNet2DConditionModel`` of the same size as ours (``UNet.to_diffusers_config()``), ``DDPMScheduler`` with
its defaults (linear betas 1e-4..0.02 over 1000 steps, epsilon prediction), uniform timesteps, MSE on the noise,
``torch.optim.AdamW`` with the script's defaults (lr 1e-4, betas 0.9/0.999, weight decay 1e-2, eps 1e-8), a constant
learning rate after 500 warm-up steps, gradient clipping at 1.0, and their ``EMAModel`` (decay 0.9999 with its own
warm-up). One addition: the captions are replaced by the empty prompt's embedding with probability 0.1, what their
SDXL and ControlNet scripts call ``--proportion_empty_prompts``, so classifier-free guidance can be evaluated at all
(the SD script trains no unconditional model). Evaluation wraps the UNet as our denoiser, so both models are
sampled and scored by the same code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass
class PeerRecipe:
    lr: float = 1e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 500
    max_grad_norm: float = 1.0
    ema_decay: float = 0.9999
    proportion_empty_prompts: float = 0.1
    seed: int = 0


def peer_unet(our_unet):
    """diffusers' UNet2DConditionModel of our UNet's configuration (random weights: it trains from scratch)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**our_unet.to_diffusers_config())


def peer_denoiser(unet) -> Callable:
    """The diffusers UNet as our denoiser interface (x_t, timestep, cond) -> eps."""
    def denoiser(x: Tensor, t: Tensor, cond: dict) -> Tensor:
        mask = cond.get("context_mask")
        return unet(x, t, encoder_hidden_states=cond["context"],
                    encoder_attention_mask=None if mask is None else mask.float()).sample.float()

    return denoiser


def train_peer(unet, batches: Iterator[tuple[Tensor, dict]], null_cond: dict, steps: int, recipe: PeerRecipe,
               on_checkpoint: Callable[[int, float, object], None] | None = None, checkpoints: tuple[int, ...] = (),
               progress: bool = True):
    """Train ``unet`` on (latents (B, C, h, w), cond) batches for ``steps`` steps; returns (the EMA UNet, seconds).

    ``on_checkpoint(step, seconds, ema_unet)`` is called at each step of ``checkpoints`` (seconds of training so far,
    evaluation time excluded).
    """
    import copy

    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm import tqdm

    torch.manual_seed(recipe.seed)
    scheduler = DDPMScheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, betas=(0.9, 0.999),
                                  weight_decay=recipe.weight_decay, eps=1e-8)
    lr_scheduler = get_scheduler("constant_with_warmup" if recipe.warmup_steps else "constant", optimizer=optimizer,
                                 num_warmup_steps=recipe.warmup_steps)
    ema = EMAModel(unet.parameters(), decay=recipe.ema_decay)
    generator = torch.Generator().manual_seed(recipe.seed)
    elapsed, unet = 0.0, unet.train()
    for step in tqdm(range(1, steps + 1), desc="diffusers recipe", disable=not progress, dynamic_ncols=True):
        start = time.perf_counter()
        latents, cond = next(batches)
        B = latents.shape[0]
        drop = torch.rand(B, generator=generator) < recipe.proportion_empty_prompts
        context = torch.where(drop[:, None, None], null_cond["context"].expand_as(cond["context"]), cond["context"])
        mask = torch.where(drop[:, None], null_cond["context_mask"].expand_as(cond["context_mask"]),
                           cond["context_mask"])
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (B,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        pred = unet(noisy, timesteps, encoder_hidden_states=context, encoder_attention_mask=mask.float()).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), recipe.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        elapsed += time.perf_counter() - start
        if on_checkpoint is not None and step in checkpoints:
            averaged = copy.deepcopy(unet)
            ema.copy_to(averaged.parameters())
            on_checkpoint(step, elapsed, averaged.eval().requires_grad_(False))
    averaged = copy.deepcopy(unet)
    ema.copy_to(averaged.parameters())
    return averaged.eval().requires_grad_(False), elapsed
