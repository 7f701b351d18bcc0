"""Stage-1 fidelity metrics against references: PSNR and SSIM against torchmetrics' implementations, the foreground
colour error against its closed form, the latent shift and scale making encoded latents zero-mean unit-variance."""

from __future__ import annotations

import pytest
import torch

from autoencoder import AutoencoderKL, measure_latent_stats, set_scale_factor
from autoencoder.metrics import fidelity, foreground_colour_error, psnr, quantize, ssim


def _images(n: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.ones(n, 3, size, size)  # white background
    base[:, :, 8:24, 8:24] = torch.rand(n, 3, 1, 1, generator=g)  # a coloured square
    return quantize(base + 0.05 * torch.randn(base.shape, generator=g))


def test_psnr_and_ssim_match_torchmetrics():
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    real = _images()
    recon = quantize(real + 0.03 * torch.randn(real.shape, generator=torch.Generator().manual_seed(1)))
    ours_psnr = psnr(recon, real)
    for i in range(len(real)):
        reference = peak_signal_noise_ratio(recon[i:i + 1].double(), real[i:i + 1].double(), data_range=1.0)
        assert float(ours_psnr[i]) == pytest.approx(float(reference), abs=1e-4)
    reference = structural_similarity_index_measure(recon.double(), real.double(), data_range=1.0, kernel_size=11,
                                                    sigma=1.5, gaussian_kernel=True, reduction="none")
    torch.testing.assert_close(ssim(recon, real).double(), reference, atol=1e-5, rtol=0)
    same = fidelity(real, real)
    assert same["ssim"] == pytest.approx(1.0) and same["fg_colour_error"] == 0.0 and same["psnr"] >= 99


def test_foreground_colour_error_is_the_mean_over_non_white_pixels():
    real = torch.ones(1, 3, 4, 4)
    real[0, :, :2, :2] = torch.tensor([240, 74, 64]).view(3, 1, 1) / 255  # a red 2 x 2 patch on white
    recon = real.clone()
    recon[0, :, :2, :2] = torch.tensor([220, 135, 63]).view(3, 1, 1) / 255  # decoded orange
    recon[0, :, 3, 3] = 0.0  # an error on the background is not counted
    assert foreground_colour_error(recon, real) == pytest.approx((20 + 61 + 1) / 3, abs=1e-4)


def test_latent_shift_and_scale_give_zero_mean_unit_variance():
    torch.manual_seed(0)
    model = AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4).eval()
    with torch.no_grad():
        model.encoder.conv_out.bias.add_(0.7)  # latents far from zero mean, as trained ones often are
    data = _images(8) * 2 - 1
    mean, std = measure_latent_stats(model, (data[i:i + 4] for i in range(0, 8, 4)), max_batches=2)
    with torch.no_grad():
        raw = model.encode_dist(data).mode()
        assert mean == pytest.approx(float(raw.double().mean()), abs=1e-6)
        assert std == pytest.approx(float(raw.double().std()), rel=1e-6)
        set_scale_factor(model, 1 / std, mean)
        z = model.encode(data)
        assert float(z.mean()) == pytest.approx(0.0, abs=1e-5) and float(z.std()) == pytest.approx(1.0, abs=1e-5)
        torch.testing.assert_close(model.decode(z), model.decode_raw(raw), atol=1e-5, rtol=0)  # the round trip
