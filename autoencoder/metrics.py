"""Reconstruction fidelity of the first stage, per image on 8-bit-quantised pixels in [0, 1]:

* PSNR = 10 log10(1 / MSE) (the mean over images of each image's PSNR);
* SSIM (Wang et al. 2004, Eq. 13) with their constants K1 = 0.01, K2 = 0.03 and an 11 x 11 Gaussian window of
  sigma 1.5, the image reflect-padded so every pixel has a window (torchmetrics' convention: at 32 px the valid
  region alone would leave out a third of the image), averaged over positions and the three colour channels;
* the mean absolute colour error of the foreground, in 8-bit units: over the pixels where the real image is not
  the white background (any channel below ``FOREGROUND``), |reconstruction - real| averaged over channels. It
  says whether the colours a caption names survive the first stage (a red that decodes orange shows here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
FOREGROUND = 250 / 255  # a pixel with any channel below this is not the white background
C1, C2 = (0.01 * 1.0) ** 2, (0.03 * 1.0) ** 2  # Wang et al. 2004 with the dynamic range L = 1


def quantize(images: Tensor) -> Tensor:
    """Images in [0, 1] rounded to the 8-bit values saving them as PNG keeps."""
    return (images.clamp(0, 1) * 255).round() / 255


def psnr(recon: Tensor, real: Tensor) -> Tensor:
    """(B,) PSNR in dB of each reconstruction (B, C, H, W) against its real image, both in [0, 1]."""
    mse = (quantize(recon) - quantize(real)).pow(2).flatten(1).mean(1)  # (B,)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    g = g / g.sum()
    return torch.outer(g, g)  # (size, size)


def ssim(recon: Tensor, real: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """(B,) mean SSIM of each reconstruction (B, C, H, W) against its real image, both in [0, 1]."""
    x, y = quantize(recon).double(), quantize(real).double()
    C = x.shape[1]
    w = _gaussian_window(window, sigma).to(x.device).expand(C, 1, window, window)  # (C, 1, k, k)

    pad = (window - 1) // 2
    x, y = (F.pad(t, (pad,) * 4, mode="reflect") for t in (x, y))

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, w, groups=C)  # (B, C, H, W) windows over the reflect-padded image

    mu_x, mu_y = blur(x), blur(y)
    var_x = (blur(x * x) - mu_x**2).clamp_min(0)
    var_y = (blur(y * y) - mu_y**2).clamp_min(0)
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + C1) * (2 * cov + C2)) / ((mu_x**2 + mu_y**2 + C1) * (var_x + var_y + C2))
    return s.flatten(1).mean(1).float()  # (B,)


def foreground_colour_error(recon: Tensor, real: Tensor) -> float:
    """Mean |reconstruction - real| over the foreground pixels of all images, in 8-bit units (0-255)."""
    x, y = quantize(recon), quantize(real)
    mask = (y < FOREGROUND).any(dim=1, keepdim=True).expand_as(y)  # (B, C, H, W)
    if not bool(mask.any()):
        return float("nan")
    return float((x - y).abs()[mask].mean() * 255)


def fidelity(recon: Tensor, real: Tensor) -> dict[str, float]:
    """psnr, ssim (means over images) and fg_colour_error of a batch of reconstructions."""
    return {"psnr": float(psnr(recon, real).mean()), "ssim": float(ssim(recon, real).mean()),
            "fg_colour_error": foreground_colour_error(recon, real)}
