"""KL-regularised autoencoder: the first stage of latent diffusion (Rombach et al. 2022, Sec. 3.1).

The encoder maps an image x in [-1, 1] of shape (B, C, H, W) to a diagonal Gaussian posterior
q(z | x) over latents of shape (B, latent_channels, H / f, W / f) with f = 2 ** (len(blocks) - 1);
the decoder maps a latent back to an image. A small KL term towards N(0, I) keeps the latent
space well behaved (the "KL-reg." variant of Sec. 3.1 and App. G).

The module tree, parameter names and numerics mirror diffusers' `AutoencoderKL`, so its
`state_dict()` loads here with `strict=True` and gives the same outputs. Submodules that only
exist to carry names (`resnets`, `downsamplers.0.conv`, `attentions.0.to_out.0`, ...) are kept
for that reason.

Latent-diffusion API: `encode` returns (z - shift_factor) * scale_factor, the unit-variance latent
the diffusion model is trained on; `decode` undoes that scaling before decoding. `encode_dist`
and `decode_raw` work on the unscaled latent.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

GROUP_NORM_EPS = 1e-6  # every GroupNorm in the autoencoder uses this eps (as in LDM / diffusers)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=GROUP_NORM_EPS, affine=True)


class DiagonalGaussian:
    """Posterior q(z | x) = N(mean, diag(exp(logvar))) of the KL autoencoder (Rombach et al. 2022, App. G)."""

    def __init__(self, moments: torch.Tensor) -> None:
        mean, logvar = torch.chunk(moments, 2, dim=1)  # (B, C, h, w) each
        self.mean = mean
        self.logvar = torch.clamp(logvar, -30.0, 20.0)  # keeps exp() finite, as in LDM
        self.std = torch.exp(0.5 * self.logvar)  # (B, C, h, w)
        self.var = torch.exp(self.logvar)  # (B, C, h, w)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draw z = mean + std * eps; eps comes from `generator` (on its own device)."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)  # (B, C, h, w)

    def mode(self) -> torch.Tensor:
        return self.mean  # (B, C, h, w)

    def kl(self) -> torch.Tensor:
        """KL(q(z | x) || N(0, I)) summed over C, H, W: 0.5 * sum(mean^2 + var - 1 - logvar)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))  # (B,)


class ResnetBlock(nn.Module):
    """Pre-norm residual block GroupNorm-SiLU-conv x2 with a 1x1 shortcut when channels change (no time input)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, C_out, H, W)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)  # (B, C_out, H, W)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv after an asymmetric (0, 1, 0, 1) zero pad: (H, W) -> (H / 2, W / 2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)  # (B, C, H + 1, W + 1)
        return self.conv(x)  # (B, C, H / 2, W / 2)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv: (H, W) -> (2H, 2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)  # (B, C, 2H, 2W)


class SelfAttention(nn.Module):
    """Single-head spatial self-attention with a residual connection, used in the mid blocks."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # named to_out.0 as in diffusers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        q = self.to_q(tokens).unsqueeze(1)  # (B, 1, HW, C): one head of width C
        k = self.to_k(tokens).unsqueeze(1)  # (B, 1, HW, C)
        v = self.to_v(tokens).unsqueeze(1)  # (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, HW, C)
        out = self.to_out[0](out)  # (B, HW, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)


class MidBlock(nn.Module):
    """ResnetBlock -> [SelfAttention] -> ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, groups: int, add_attention: bool) -> None:
        super().__init__()
        # Registration order (attentions first) follows diffusers, so state_dict keys come in the same order.
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)] if add_attention else [])
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)  # (B, C, h, w)
        for attention in self.attentions:
            x = attention(x)  # (B, C, h, w)
        return self.resnets[1](x)  # (B, C, h, w)


class DownBlock(nn.Module):
    """`layers` ResnetBlocks, then an optional Downsample (absent in the last encoder block)."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool) -> None:
        super().__init__()
        channels = [in_channels] + [out_channels] * layers
        self.resnets = nn.ModuleList([ResnetBlock(channels[i], channels[i + 1], groups) for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in (*self.resnets, *self.downsamplers):
            x = module(x)
        return x


class UpBlock(nn.Module):
    """`layers` ResnetBlocks, then an optional Upsample (absent in the last decoder block)."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool) -> None:
        super().__init__()
        channels = [in_channels] + [out_channels] * layers
        self.resnets = nn.ModuleList([ResnetBlock(channels[i], channels[i + 1], groups) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in (*self.resnets, *self.upsamplers):
            x = module(x)
        return x


class Encoder(nn.Module):
    """Image (B, C_in, H, W) -> posterior moments (B, 2 * latent_channels, H / f, W / f)."""

    def __init__(
        self, in_channels: int, latent_channels: int, block_out_channels: Sequence[int], layers_per_block: int,
        groups: int, mid_block_add_attention: bool,
    ) -> None:
        super().__init__()
        last = len(block_out_channels) - 1
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        ins = [block_out_channels[0], *block_out_channels[:-1]]
        self.down_blocks = nn.ModuleList(
            DownBlock(ins[i], block_out_channels[i], layers_per_block, groups, downsample=i < last)
            for i in range(len(block_out_channels))
        )
        self.mid_block = MidBlock(block_out_channels[-1], groups, mid_block_add_attention)
        self.conv_norm_out = group_norm(block_out_channels[-1], groups)
        self.conv_out = nn.Conv2d(block_out_channels[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, C0, H, W)
        for block in self.down_blocks:
            h = block(h)  # ends at (B, C_last, H / f, W / f)
        h = self.mid_block(h)  # (B, C_last, H / f, W / f)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 2 * latent, H / f, W / f)


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, C_out, h * f, w * f)."""

    def __init__(
        self, out_channels: int, latent_channels: int, block_out_channels: Sequence[int], layers_per_block: int,
        groups: int, mid_block_add_attention: bool,
    ) -> None:
        super().__init__()
        reversed_channels = list(reversed(block_out_channels))
        last = len(reversed_channels) - 1
        self.conv_in = nn.Conv2d(latent_channels, reversed_channels[0], 3, padding=1)
        ins = [reversed_channels[0], *reversed_channels[:-1]]
        # One more ResnetBlock per level than the encoder (as in LDM). up_blocks is registered before
        # mid_block, as in diffusers, so state_dict keys come in the same order.
        self.up_blocks = nn.ModuleList(
            UpBlock(ins[i], reversed_channels[i], layers_per_block + 1, groups, upsample=i < last)
            for i in range(len(reversed_channels))
        )
        self.mid_block = MidBlock(reversed_channels[0], groups, mid_block_add_attention)
        self.conv_norm_out = group_norm(reversed_channels[-1], groups)
        self.conv_out = nn.Conv2d(reversed_channels[-1], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # (B, C_last, h, w)
        h = self.mid_block(h)  # (B, C_last, h, w)
        for block in self.up_blocks:
            h = block(h)  # ends at (B, C0, h * f, w * f)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, C_out, h * f, w * f)


class AutoencoderKL(nn.Module):
    """KL autoencoder of latent diffusion (Rombach et al. 2022), weight-compatible with diffusers' AutoencoderKL."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        latent_channels: int = 4,
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 1,
        norm_num_groups: int = 32,
        mid_block_add_attention: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        scale_factor: float = 1.0,
        shift_factor: float = 0.0,
    ) -> None:
        super().__init__()
        block_out_channels = tuple(int(c) for c in block_out_channels)
        if not block_out_channels:
            raise ValueError("block_out_channels must name at least one level")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("latent_channels", latent_channels), ("layers_per_block", layers_per_block)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        bad = [c for c in block_out_channels if c % norm_num_groups != 0]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups={norm_num_groups}")
        if scale_factor == 0:
            raise ValueError("scale_factor must be non-zero")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.latent_channels = latent_channels
        self.block_out_channels = block_out_channels
        self.layers_per_block = layers_per_block
        self.norm_num_groups = norm_num_groups
        self.mid_block_add_attention = mid_block_add_attention
        self.use_quant_conv = use_quant_conv
        self.use_post_quant_conv = use_post_quant_conv
        # Plain floats, not buffers: they live in config.json, and the state_dict stays diffusers-compatible.
        self.scale_factor = float(scale_factor)
        self.shift_factor = float(shift_factor)

        common = dict(latent_channels=latent_channels, block_out_channels=block_out_channels,
                      layers_per_block=layers_per_block, groups=norm_num_groups,
                      mid_block_add_attention=mid_block_add_attention)
        self.encoder = Encoder(in_channels=in_channels, **common)
        self.decoder = Decoder(out_channels=out_channels, **common)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-friendly) that rebuild this model, including the current scaling."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "latent_channels": self.latent_channels,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_num_groups,
            "mid_block_add_attention": self.mid_block_add_attention,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "scale_factor": self.scale_factor,
            "shift_factor": self.shift_factor,
        }

    def to_diffusers_config(self) -> dict[str, Any]:
        """Keyword arguments of diffusers' AutoencoderKL with the same modules, shapes and latent scaling."""
        levels = len(self.block_out_channels)
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "latent_channels": self.latent_channels,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_num_groups,
            "act_fn": "silu",
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
            "mid_block_add_attention": self.mid_block_add_attention,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "scaling_factor": self.scale_factor,
            "shift_factor": self.shift_factor,
        }

    @property
    def downsample_factor(self) -> int:
        """Spatial factor f between image and latent: 2 ** (number of levels - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def encode_dist(self, x: torch.Tensor) -> DiagonalGaussian:
        """Posterior q(z | x) over the raw (unscaled) latent; x in [-1, 1] of shape (B, C_in, H, W)."""
        moments = self.encoder(x)  # (B, 2 * latent, H / f, W / f)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)  # (B, 2 * latent, H / f, W / f)
        return DiagonalGaussian(moments)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Decode a raw (unscaled) latent (B, latent, h, w) to an image (B, C_out, h * f, w * f)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)  # (B, latent, h, w)
        return self.decoder(z)  # (B, C_out, h * f, w * f)

    def encode(
        self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
    ) -> torch.Tensor:
        """Diffusion-space latent (z - shift_factor) * scale_factor, z the posterior mode (or a sample)."""
        posterior = self.encode_dist(x)
        z = posterior.sample(generator) if sample else posterior.mode()  # (B, latent, H / f, W / f)
        return (z - self.shift_factor) * self.scale_factor  # (B, latent, H / f, W / f)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Image from a diffusion-space latent: decode_raw(z / scale_factor + shift_factor)."""
        return self.decode_raw(z / self.scale_factor + self.shift_factor)  # (B, C_out, H, W)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Training pass: reconstruct x through a posterior sample (or the mode); returns (recon, posterior)."""
        posterior = self.encode_dist(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()  # (B, latent, h, w)
        return self.decode_raw(z), posterior  # (B, C_out, H, W)
