"""The patch-adversarial term of the LDM first stage (Rombach et al. 2022, Sec. 3.1, after Esser et al. 2021).

A PatchGAN discriminator (Isola et al. 2017) scores overlapping patches of an image as real or reconstructed; it is
trained with the hinge loss

    L_D = mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))

and the autoencoder gets L_G = -mean(D(x_hat)), weighted adaptively (Esser et al. 2021, Eq. 7) so that neither
term swamps the other:

    lambda = ||grad_{w_L} L_rec|| / (||grad_{w_L} L_G|| + delta),   w_L the decoder's last layer, delta = 1e-4,

clamped to [0, 1e4], times ``disc_weight``, and switched on at ``disc_start`` (the first steps train the
reconstruction alone: a discriminator facing blurry early outputs only teaches noise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B, 1, H / 2^layers - 2, ...) patch logits: conv 4x4 stride 2 + LeakyReLU, then
    ``layers - 1`` strided convs with batch norm, one stride-1 conv with batch norm, and a 1-channel 4x4 conv."""

    def __init__(self, in_channels: int = 3, channels: int = 32, layers: int = 2) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            seq += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2, True)]
            width = out
        seq.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*seq)
        for m in self.modules():  # the pix2pix initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, h', w')


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss, the mean of its real and fake halves (scalar)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The autoencoder's adversarial loss: -mean D(x_hat) (scalar)."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    delta: float = 1e-4) -> torch.Tensor:
    """||d rec / d w_L|| / (||d g / d w_L|| + delta), clamped to [0, 1e4] and detached (a scalar tensor)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + delta)).clamp(0.0, 1e4).detach()
