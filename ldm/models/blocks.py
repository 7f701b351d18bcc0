"""UNet building blocks in diffusers' layout: ResNet blocks, down/up samplers, encoder/decoder levels, middle.

Module and parameter names follow diffusers' ``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D``,
``CrossAttnDownBlock2D``/``DownBlock2D``, ``CrossAttnUpBlock2D``/``UpBlock2D`` and ``UNetMidBlock2DCrossAttn``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.models.attention import SpatialTransformer


def _maybe_checkpoint(enabled: bool, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """Run fn(*args), recomputing its activations in backward when enabled and grads are on."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)



class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added between (diffusers ResnetBlock2D)."""

    def __init__(self, in_channels: int, out_channels: int, temb_dim: int, norm_num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-5)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_channels)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=1e-5)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Map x (B, Cin, H, W) and temb (B, T) to (B, Cout, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Cout, H, W)
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, Cout, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, Cout, H, W)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)  # (B, Cout, H, W)
        return x + h


class Downsample(nn.Module):
    """Strided 3x3 convolution halving height and width (rounding up)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, C, H, W) to (B, C, ceil(H/2), ceil(W/2))."""
        return self.conv(x)


# Per axis, a 3x3 convolution (taps w0, w1, w2) of a nearest-neighbour x2 upsampled signal gives output
# 2m from x[m-1] w0 + x[m] (w1 + w2) and output 2m+1 from x[m] (w0 + w1) + x[m+1] w2: a stride-2 transposed
# convolution with the 4 taps [w2, w1 + w2, w0 + w1, w0] (padding 1), i.e. taps = _UPSAMPLE_TAPS @ w.
_UPSAMPLE_TAPS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


class UpsampleConv(nn.Conv2d):
    """A 3x3 convolution (diffusers' Upsample2D conv, same parameters) applied after nearest upsampling.

    For the usual exact doubling it runs as one transposed convolution whose 4x4 kernel holds sums of the
    3x3 taps: 4/9 of the multiply-adds, and no upsampled copy of the input in forward or backward.
    """

    def __init__(self, channels: int):
        super().__init__(channels, channels, kernel_size=3, padding=1)
        self.register_buffer("taps", _UPSAMPLE_TAPS.clone(), persistent=False)  # moves with the module

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Map (B, C, h, w) to (B, C, *size) as conv(nearest_upsample(x, size))."""
        if tuple(size) != (2 * x.shape[-2], 2 * x.shape[-1]):  # odd skip size: upsample explicitly
            return super().forward(F.interpolate(x, size=size, mode="nearest"))
        dtype = torch.promote_types(self.weight.dtype, torch.float32)  # sum bf16/fp16 taps in fp32
        taps = self.taps.to(dtype)  # (4, 3), entries 0/1: exact in any dtype
        kernel = torch.einsum("ka,oiab,lb->iokl", taps, self.weight.to(dtype), taps)  # (Cin, Cout, 4, 4)
        return F.conv_transpose2d(x, kernel.to(self.weight.dtype), self.bias, stride=2, padding=1)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to the skip connection's size, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = UpsampleConv(channels)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Map (B, C, h, w) to (B, C, *size); size is 2x (h, w) unless the input size was odd."""
        return self.conv(x, size)


class _Level(nn.Module):
    """Shared parts of down and up blocks: resnets, optional transformers, checkpointing flag."""

    gradient_checkpointing: bool = False

    def _build(self, resnets: list[ResnetBlock], attention: dict[str, Any] | None, channels: int) -> None:
        self.resnets = nn.ModuleList(resnets)
        if attention is not None:
            self.attentions = nn.ModuleList([SpatialTransformer(channels, **attention) for _ in resnets])
        else:
            self.attentions = None

    def _layer(
        self, i: int, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Apply resnet i and, if present, transformer i."""
        h = _maybe_checkpoint(self.gradient_checkpointing, self.resnets[i], h, temb)
        if self.attentions is not None:
            h = _maybe_checkpoint(self.gradient_checkpointing, self.attentions[i], h, context, mask)
        return h


class DownBlock(_Level):
    """One encoder level: resnets (+ transformers), then an optional downsampler."""

    def __init__(
        self, in_channels: int, out_channels: int, temb_dim: int, num_layers: int, norm_num_groups: int,
        attention: dict[str, Any] | None, add_downsample: bool,
    ):
        super().__init__()
        resnets = [
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, temb_dim, norm_num_groups)
            for i in range(num_layers)
        ]
        self._build(resnets, attention, out_channels)
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if add_downsample else None

    def forward(
        self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return the block output and every intermediate state kept for the skip connections."""
        skips = []
        for i in range(len(self.resnets)):
            h = self._layer(i, h, temb, context, mask)  # (B, Cout, H, W)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)  # (B, Cout, H/2, W/2)
            skips.append(h)
        return h, skips


class UpBlock(_Level):
    """One decoder level: resnets on [h, skip] concatenations (+ transformers), optional upsampler."""

    def __init__(
        self, prev_channels: int, out_channels: int, skip_in_channels: int, temb_dim: int, num_layers: int,
        norm_num_groups: int, attention: dict[str, Any] | None, add_upsample: bool,
    ):
        super().__init__()
        resnets = []
        for i in range(num_layers):
            skip_channels = skip_in_channels if i == num_layers - 1 else out_channels
            in_channels = prev_channels if i == 0 else out_channels
            resnets.append(ResnetBlock(in_channels + skip_channels, out_channels, temb_dim, norm_num_groups))
        self._build(resnets, attention, out_channels)
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if add_upsample else None

    def forward(
        self, h: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor, context: torch.Tensor,
        mask: torch.Tensor | None, upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Consume skips from the end (last in, first out) and return the block output."""
        for i in range(len(self.resnets)):
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + Cskip, H, W)
            h = self._layer(i, h, temb, context, mask)  # (B, Cout, H, W)
        if self.upsamplers is not None:
            assert upsample_size is not None
            h = self.upsamplers[0](h, upsample_size)  # (B, Cout, 2H, 2W)
        return h


class MidBlock(nn.Module):
    """Bottleneck: resnet, transformer, resnet."""

    gradient_checkpointing: bool = False

    def __init__(self, channels: int, temb_dim: int, norm_num_groups: int, attention: dict[str, Any]):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, temb_dim, norm_num_groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialTransformer(channels, **attention)])

    def forward(
        self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Map (B, C, H, W) to the same shape."""
        ckpt = self.gradient_checkpointing
        h = _maybe_checkpoint(ckpt, self.resnets[0], h, temb)  # (B, C, H, W)
        h = _maybe_checkpoint(ckpt, self.attentions[0], h, context, mask)  # (B, C, H, W)
        return _maybe_checkpoint(ckpt, self.resnets[1], h, temb)  # (B, C, H, W)

