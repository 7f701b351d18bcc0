"""Plain-torch training loop for the KL autoencoder (stage 1 of Rombach et al. 2022).

One optimiser (AdamW, fused where torch has it), reconstruction + KL loss, a linear warm-up and a cosine (or
constant) learning rate; with ``disc_weight`` > 0 the patch-adversarial term of the LDM first stage from step
``disc_start`` on (``autoencoder.adversarial``: a PatchGAN discriminator with its own optimiser, hinge loss,
adaptive weight). The network is convolutional, so it can train on random crops of the
images (``crop``) and still encode whole images: at a fixed budget, crops buy more steps. Runs on the model's
device. Metrics go to the caller through `on_log`; this module does no tracking or file I/O.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from autoencoder.adversarial import PatchDiscriminator, adaptive_weight, generator_loss, hinge_d_loss
from autoencoder.loss import autoencoder_loss
from autoencoder.model import AutoencoderKL


def train_autoencoder(
    model: AutoencoderKL,
    batches: Iterator[torch.Tensor],
    *,
    steps: int,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    loss: str = "l1",
    seed: int = 0,
    lr_schedule: str = "constant",
    warmup_steps: int = 0,
    crop: int | None = None,
    log_every: int = 50,
    disc_weight: float = 0.0,
    disc_start: int = 0,
    disc_layers: int = 2,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Train for `steps` optimiser steps on image batches (B, C, H, W) in [-1, 1]; returns final metrics.

    Logged metrics are means over the last `log_every` steps (keys of `autoencoder_loss` plus
    "lr"); the returned dict is the last logged one plus "steps". Posterior samples come from a
    generator seeded with `seed`, so a run is reproducible from its seed and data order.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    if disc_weight < 0 or disc_start < 0:
        raise ValueError(f"disc_weight and disc_start must be >= 0, got {disc_weight} and {disc_start}")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    device = next(model.parameters()).device
    model.requires_grad_(True)  # a model from load_pretrained comes frozen; fine-tuning unfreezes it
    model.train()
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=fused)
    disc = PatchDiscriminator(model.out_channels, layers=disc_layers).to(device) if disc_weight > 0 else None
    disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=lr, betas=(0.5, 0.9), fused=fused) if disc else None

    def lr_at(step: int) -> float:  # step counts from 1
        if step <= warmup_steps:
            return lr * step / warmup_steps
        if lr_schedule == "constant":
            return lr
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return lr * 0.5 * (1 + math.cos(math.pi * progress))

    generator = torch.Generator(device=device).manual_seed(seed)
    crops = torch.Generator().manual_seed(seed + 1)

    window: dict[str, float] = {}
    counts: dict[str, int] = {}  # steps each key was logged in this window (the adversarial ones start later)
    metrics: dict[str, float] = {}
    batch_iter = iter(batches)
    bar = tqdm(total=steps, desc="autoencoder", disable=not progress, dynamic_ncols=True)
    try:
        for step in range(1, steps + 1):
            try:
                images = next(batch_iter)
            except StopIteration:
                raise ValueError(f"batch iterator ran out after {step - 1} of {steps} steps") from None
            images = images.to(device, non_blocking=True)  # (B, C, H, W)
            if crop is not None and crop < min(images.shape[-2:]):
                top, left = (int(torch.randint(0, n - crop + 1, (1,), generator=crops)) for n in images.shape[-2:])
                images = images[..., top:top + crop, left:left + crop]  # (B, C, crop, crop)
            for group in [*optimizer.param_groups, *(disc_optimizer.param_groups if disc else [])]:
                group["lr"] = lr_at(step)
            recon, posterior = model(images, generator=generator)  # (B, C, H, W)
            total, parts = autoencoder_loss(recon, images, posterior, kl_weight=kl_weight, kind=loss)
            adversarial = disc is not None and step > disc_start
            if adversarial:
                disc.requires_grad_(False)  # the autoencoder's step: no gradients for the discriminator
                g_loss = generator_loss(disc(recon))
                weight = disc_weight * adaptive_weight(total, g_loss, model.decoder.conv_out.weight)
                total = total + weight * g_loss
                parts.update(g_loss=g_loss.item(), disc_lambda=weight.item(), loss=total.item())
            if not math.isfinite(parts["loss"]):
                raise FloatingPointError(f"non-finite autoencoder loss at step {step}: {parts}")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            if adversarial:
                disc.requires_grad_(True)
                d_loss = hinge_d_loss(disc(images), disc(recon.detach()))
                disc_optimizer.zero_grad(set_to_none=True)
                d_loss.backward()
                disc_optimizer.step()
                parts["d_loss"] = d_loss.item()

            for key, value in parts.items():
                window[key] = window.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1
            bar.update(1)
            if step % log_every == 0 or step == steps:
                metrics = {key: value / counts[key] for key, value in window.items()}
                metrics["lr"] = lr_at(step)
                bar.set_postfix(loss=f"{metrics['loss']:.4g}", rec=f"{metrics['rec_per_pixel']:.4g}")
                if on_log is not None:
                    on_log(step, dict(metrics))
                window, counts = {}, {}
    finally:
        bar.close()
    return {**metrics, "steps": float(steps)}
