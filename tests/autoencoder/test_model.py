"""The KL autoencoder matches diffusers' AutoencoderKL weight for weight and output for output."""

import pytest
import torch

from autoencoder.model import AutoencoderKL, DiagonalGaussian

diffusers = pytest.importorskip("diffusers")

CONFIGS = {
    "attention": dict(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1, latent_channels=4),
    "no_attention_no_quant": dict(
        block_out_channels=(16, 32, 32), norm_num_groups=8, layers_per_block=2, latent_channels=3,
        mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False,
    ),
}
TOL = 1e-5


def diffusers_pair(config: dict, seed: int = 0):
    levels = len(config["block_out_channels"])
    torch.manual_seed(seed)
    reference = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels, **config
    ).eval()
    ours = AutoencoderKL(**config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers(name: str) -> None:
    config = CONFIGS[name]
    reference, ours = diffusers_pair(config)
    assert list(ours.state_dict()) == list(reference.state_dict())  # same names, same order
    reference.load_state_dict(ours.state_dict(), strict=True)  # and back

    torch.manual_seed(1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1  # (B, C, H, W)
    with torch.no_grad():
        expected = reference.encode(x).latent_dist
        posterior = ours.encode_dist(x)
        f = ours.downsample_factor
        assert posterior.mean.shape == (2, config["latent_channels"], 16 // f, 16 // f)
        assert (posterior.mean - expected.mean).abs().max() < TOL
        assert (posterior.logvar - expected.logvar).abs().max() < TOL
        z = torch.randn_like(posterior.mean)
        image = ours.decode_raw(z)
        assert image.shape == x.shape
        assert (image - reference.decode(z).sample).abs().max() < TOL


def test_scaled_api_matches_diffusers_convention() -> None:
    reference, ours = diffusers_pair(CONFIGS["attention"])
    ours.scale_factor, ours.shift_factor = 0.5, 0.1
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mode = reference.encode(x).latent_dist.mode()
        z = ours.encode(x)  # diffusion-space latent
        assert torch.allclose(z, (mode - 0.1) * 0.5, atol=TOL)
        assert (ours.decode(z) - reference.decode(z / 0.5 + 0.1).sample).abs().max() < TOL
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        assert torch.equal(ours.encode(x, generator=g1, sample=True), ours.encode(x, generator=g2, sample=True))


def test_forward_returns_reconstruction_and_posterior() -> None:
    model = AutoencoderKL(block_out_channels=(8, 16, 16), norm_num_groups=4)
    x = torch.zeros(2, 3, 16, 16)
    recon, posterior = model(x, generator=torch.Generator().manual_seed(0))
    assert model.downsample_factor == 4
    assert recon.shape == x.shape and posterior.mean.shape == (2, 4, 4, 4)


def test_kl_matches_closed_form_and_logvar_is_clamped() -> None:
    torch.manual_seed(0)
    moments = torch.randn(3, 8, 4, 4)
    moments[0, 4, 0, 0] = 100.0  # clamped to logvar 20
    posterior = DiagonalGaussian(moments)
    mu, logvar = moments[:, :4], moments[:, 4:].clamp(-30, 20)
    expected = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    assert posterior.logvar.max() == 20.0
    assert torch.allclose(posterior.kl(), expected)
    assert torch.allclose(posterior.std, (0.5 * logvar).exp())
    assert torch.equal(posterior.mode(), mu)
    assert torch.allclose(DiagonalGaussian(torch.zeros(1, 8, 2, 2)).kl(), torch.zeros(1))


def test_sample_uses_the_generator() -> None:
    torch.manual_seed(0)
    posterior = DiagonalGaussian(torch.randn(2, 8, 4, 4))
    a = posterior.sample(torch.Generator().manual_seed(7))
    b = posterior.sample(torch.Generator().manual_seed(7))
    c = posterior.sample(torch.Generator().manual_seed(8))
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a, posterior.mean + posterior.std * eps)


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderKL(block_out_channels=(24, 48), norm_num_groups=32)
    with pytest.raises(ValueError, match="block_out_channels"):
        AutoencoderKL(block_out_channels=())
