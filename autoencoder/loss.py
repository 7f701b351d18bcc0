"""Stage-1 loss of the KL autoencoder (Rombach et al. 2022, Sec. 3.1 and App. G).

    L = rec(x, x_hat) + kl_weight * KL(q(z | x) || N(0, I))

Both terms are summed over C, H, W and averaged over the batch, the reduction of the LDM
reference code, so `kl_weight` (1e-6 there) keeps its meaning whatever the image size. The
perceptual (LPIPS) and patch-adversarial terms of the paper are not implemented (no pretrained
weights offline); `extra_terms` is the hook where a perceptual loss plugs in. An adversarial term
needs its own discriminator and optimiser step, so it belongs in the training loop, not here.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from autoencoder.model import DiagonalGaussian

RECONSTRUCTION_KINDS = ("l1", "l2")

# An extra term maps (recon, target), both (B, C, H, W), to a per-image loss of shape (B,).
ExtraTerm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def reconstruction_error(recon: torch.Tensor, target: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Element-wise |x_hat - x| (l1) or (x_hat - x)^2 (l2), shape (B, C, H, W)."""
    if kind == "l1":
        return (recon - target).abs()
    if kind == "l2":
        return (recon - target).pow(2)
    raise ValueError(f"unknown reconstruction loss {kind!r}; expected one of {RECONSTRUCTION_KINDS}")


def autoencoder_loss(
    recon: torch.Tensor,
    target: torch.Tensor,
    posterior: DiagonalGaussian,
    *,
    kl_weight: float = 1e-6,
    kind: str = "l1",
    extra_terms: Mapping[str, tuple[float, ExtraTerm]] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """rec + kl_weight * KL (+ sum of weighted extra terms), each summed per image and averaged over B.

    Returns the scalar loss to backpropagate and its parts as floats: "loss", "rec" (per image),
    "rec_per_pixel" (mean per element, easier to read), "kl" (per image) and one entry per extra term.
    """
    if recon.shape != target.shape:
        raise ValueError(f"recon shape {tuple(recon.shape)} != target shape {tuple(target.shape)}")
    error = reconstruction_error(recon, target, kind)  # (B, C, H, W)
    rec = error.sum(dim=(1, 2, 3)).mean()  # scalar
    kl = posterior.kl().mean()  # scalar
    loss = rec + kl_weight * kl
    parts = {"rec": rec.item(), "rec_per_pixel": error.mean().item(), "kl": kl.item()}
    for name, (weight, term) in (extra_terms or {}).items():
        value = term(recon, target).mean()  # scalar
        loss = loss + weight * value
        parts[name] = value.item()
    parts["loss"] = loss.item()
    return loss, parts
