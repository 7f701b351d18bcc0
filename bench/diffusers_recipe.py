"""The peer: diffusers' text-to-image training loop (``examples/text_to_image/train_text_to_image.py``) over
diffusers' own parts, on exactly the batches our trainer reads, for the side-by-side of ``bench_recipe``.

What is diffusers' here: ``UNet2DConditionModel`` (of our UNet's configuration, random weights), ``DDPMScheduler``
(its defaults: linear betas 1e-4..0.02 over 1000 steps, epsilon prediction), uniform integer timesteps, MSE on the
noise, ``torch.optim.AdamW``, ``diffusers.optimization.get_scheduler`` and ``diffusers.training_utils.EMAModel``,
gradient clipping, the order of operations of the script's loop. What is shared with our trainer, so that only the
implementation differs: the batches (``peer_batches``: our trainer's own stream of cached latents and cached text
embeddings, the same samples in the same order) and the null condition that replaces a caption with probability
``proportion_empty_prompts`` (what diffusers' SDXL and ControlNet scripts call ``--proportion_empty_prompts``; the
SD script trains no unconditional model, so classifier-free guidance could not be evaluated without it).

Hyper-parameters are a ``PeerRecipe``. ``SCRIPT_DEFAULTS`` is the script as shipped: lr 1e-4, ``--lr_scheduler
constant`` (with which ``get_scheduler`` ignores ``--lr_warmup_steps``: no warm-up), AdamW weight decay 1e-2,
``--use_ema`` at 0.9999 with EMAModel's (1 + k) / (10 + k) warm-up. ``with_our_hparams`` gives it the
hyper-parameters of one of our configs (the implementation-parity run).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass(frozen=True)
class PeerRecipe:
    lr: float = 1e-4
    lr_schedule: str = "constant"  # get_scheduler's name: constant | cosine (warm-up applies to cosine only)
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    ema_decay: float = 0.9999
    proportion_empty_prompts: float = 0.1
    seed: int = 0

    def describe(self) -> str:
        warm = f" + {self.warmup_steps} warm-up" if self.lr_schedule != "constant" and self.warmup_steps else ""
        return (f"lr {self.lr:g} {self.lr_schedule}{warm}, weight decay {self.weight_decay:g}, "
                f"EMA {self.ema_decay:g}, {self.proportion_empty_prompts:g} empty prompts")


SCRIPT_DEFAULTS = PeerRecipe()


def with_our_hparams(cfg) -> PeerRecipe:
    """The peer recipe with one of our LDM configs' hyper-parameters (eps on the DDPM chain, uniform timesteps)."""
    d, t = cfg.diffusion, cfg.train
    if (d.process, d.prediction, d.schedule, d.objective) != ("discrete", "eps", "linear", "denoising"):
        raise ValueError("the peer trains eps on diffusers' linear DDPM chain; the config must too")
    if t.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"no diffusers schedule for train.lr_schedule={t.lr_schedule!r}")
    return PeerRecipe(lr=t.lr, lr_schedule=t.lr_schedule, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
                      max_grad_norm=t.grad_clip, ema_decay=t.ema_decay, proportion_empty_prompts=d.cond_dropout,
                      seed=cfg.run.seed)


def peer_unet(our_unet):
    """diffusers' UNet2DConditionModel of our UNet's configuration (random weights: it trains from scratch)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**our_unet.to_diffusers_config())


def peer_denoiser(unet) -> Callable:
    """The diffusers UNet as our denoiser interface (x_t, timestep, cond) -> eps, for sampling and evaluation."""
    def denoiser(x: Tensor, t: Tensor, cond: dict) -> Tensor:
        mask = cond.get("context_mask")
        return unet(x, t, encoder_hidden_states=cond["context"],
                    encoder_attention_mask=None if mask is None else mask.float()).sample.float()

    return denoiser


def peer_batches(cfg, parts) -> Iterator[tuple[Tensor, dict, list[str]]]:
    """(latents (B, C, h, w), cond, keys) of exactly the micro-batches a one-process ``ldm-train`` run of ``cfg``
    reads, in its order: the trainer's own stream function and the assembly's conditioning of a batch."""
    from ldm.data.run_stream import DataPosition, batch_stream

    position = DataPosition.of(cfg.data, 1, cfg.train.grad_accum)
    for batch in batch_stream(cfg.data, cfg.run.seed, 0, 1, position):
        if "latent" not in batch:
            raise ValueError("the peer trains from cached latents (data.latents or data.text_cache)")
        yield batch["latent"], parts.conditioning(batch, batch["latent"]), list(batch["key"])


class PeerTrainer:
    """diffusers' training loop, one optimizer step per ``step()`` (time it, interleave it with ours)."""

    def __init__(self, unet, null_cond: dict, recipe: PeerRecipe, total_steps: int):
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        torch.manual_seed(recipe.seed)
        self.unet, self.null_cond, self.recipe = unet.train(), null_cond, recipe
        self.scheduler = DDPMScheduler()
        self.optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, betas=(0.9, 0.999),
                                           weight_decay=recipe.weight_decay, eps=1e-8)
        self.lr_scheduler = get_scheduler(recipe.lr_schedule, optimizer=self.optimizer,
                                          num_warmup_steps=recipe.warmup_steps, num_training_steps=total_steps)
        self.ema = EMAModel(unet.parameters(), decay=recipe.ema_decay)
        self.generator = torch.Generator().manual_seed(recipe.seed)
        self.steps = 0

    def step(self, latents: Tensor, cond: dict) -> float:
        """One step on a batch (the loop body of train_text_to_image.py); returns the loss."""
        B, g = latents.shape[0], self.generator
        drop = torch.rand(B, generator=g) < self.recipe.proportion_empty_prompts
        context = torch.where(drop[:, None, None], self.null_cond["context"].expand_as(cond["context"]),
                              cond["context"])  # (B, L, D)
        mask = torch.where(drop[:, None], self.null_cond["context_mask"].expand_as(cond["context_mask"]),
                           cond["context_mask"])  # (B, L)
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (B,), generator=g)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        pred = self.unet(noisy, timesteps, encoder_hidden_states=context, encoder_attention_mask=mask.float()).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.recipe.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.unet.parameters())
        self.steps += 1
        return float(loss)

    def averaged(self):
        """A frozen copy of the UNet with the EMA weights (what the script saves and we evaluate)."""
        unet = copy.deepcopy(self.unet)
        self.ema.copy_to(unet.parameters())
        return unet.eval().requires_grad_(False)


def train_peer(trainer: PeerTrainer, batches: Iterator, steps: int,
               on_checkpoint: Callable[[int, float, object], None] | None = None, checkpoints: tuple[int, ...] = (),
               progress: bool = True) -> tuple[object, float]:
    """Run ``steps`` steps; returns (the EMA UNet, process CPU seconds of training). ``on_checkpoint(step, cpu_seconds,
    ema_unet)`` at each step of ``checkpoints`` (its own time is not counted)."""
    from tqdm import tqdm

    cpu = 0.0
    for step in tqdm(range(1, steps + 1), desc="diffusers loop", disable=not progress, dynamic_ncols=True):
        start = time.process_time()
        latents, cond, _ = next(batches)
        trainer.step(latents, cond)
        cpu += time.process_time() - start
        if on_checkpoint is not None and step in checkpoints:
            on_checkpoint(step, cpu, trainer.averaged())
    return trainer.averaged(), cpu


def sweep(base: PeerRecipe = SCRIPT_DEFAULTS) -> dict[str, PeerRecipe]:
    """The peer's tuning sweep: learning rate, schedule and warm-up, as many points as our recipes' sweep had, and
    4e-3 and 8e-3 beyond them (2e-3, the highest of the six, was the best: the sweep must bracket the peer's best
    rate)."""
    return {
        "diffusers-lr2.5e-4-cosine": replace(base, lr=2.5e-4, lr_schedule="cosine", warmup_steps=100),
        "diffusers-lr5e-4-cosine": replace(base, lr=5e-4, lr_schedule="cosine", warmup_steps=100),
        "diffusers-lr1e-3-cosine": replace(base, lr=1e-3, lr_schedule="cosine", warmup_steps=100),
        "diffusers-lr2e-3-cosine": replace(base, lr=2e-3, lr_schedule="cosine", warmup_steps=100),
        "diffusers-lr4e-3-cosine": replace(base, lr=4e-3, lr_schedule="cosine", warmup_steps=100),
        "diffusers-lr8e-3-cosine": replace(base, lr=8e-3, lr_schedule="cosine", warmup_steps=100),
        "diffusers-lr5e-4-constant": replace(base, lr=5e-4),
        "diffusers-lr1e-3-cosine-warmup500": replace(base, lr=1e-3, lr_schedule="cosine", warmup_steps=500),
    }
