"""Text-conditioned UNet for latent diffusion (Rombach et al. 2022, Sec. 3.3 and Appendix E.2).

ResNet blocks take the sinusoidal timestep embedding (Ho et al. 2020); spatial transformers
cross-attend to text token embeddings. The module tree and parameter names mirror diffusers'
``UNet2DConditionModel`` (conv_in, time_embedding, down_blocks, mid_block, up_blocks,
conv_norm_out, conv_out), so ``load_state_dict`` takes its weights strictly and
``to_diffusers_config`` gives the matching diffusers constructor arguments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.models.attention import SpatialTransformer

DEFAULT_NUM_HEADS = 8


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of (possibly fractional) timesteps t (B,) -> (B, dim)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t.float()[:, None] * torch.exp(exponent)[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # (B, dim)
    return emb


def drop_padding(
    context: torch.Tensor, context_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Remove context positions no sample attends to, and a mask that masks nothing (same result, less work).

    A masked key gets zero attention weight, so dropping the columns masked in every row is exact;
    with text padded to a fixed length this shortens cross-attention to the batch's longest prompt.
    """
    if context_mask is None:
        return context, None
    keep = context_mask.bool().any(dim=0)  # (L,)
    if bool(keep.any()) and not bool(keep.all()):
        context, context_mask = context[:, keep], context_mask[:, keep]  # (B, L', D), (B, L')
    return context, (None if bool(context_mask.all()) else context_mask)


def _maybe_checkpoint(enabled: bool, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """Run fn(*args), recomputing its activations in backward when enabled and grads are on."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class SinusoidalTimesteps(nn.Module):
    """Parameter-free timestep features (flip_sin_to_cos=True, freq_shift=0, as in SD)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Embed t (B,) as (B, dim)."""
        return timestep_embedding(t, self.dim)


class TimestepEmbedding(nn.Module):
    """Two-layer SiLU MLP on the sinusoidal features."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, in_dim) to (B, dim)."""
        return self.linear_2(F.silu(self.linear_1(x)))


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


def _per_level(value: int | Sequence[int], levels: int, name: str) -> tuple[int, ...]:
    """Broadcast an int to one value per level, or check a sequence has one per level."""
    values = (value,) * levels if isinstance(value, int) else tuple(value)
    if len(values) != levels:
        raise ValueError(f"{name} has {len(values)} entries, expected one per level ({levels})")
    return values


class UNet(nn.Module):
    """Latent-diffusion UNet: (x_t, t, context) -> prediction with the shape of x_t."""

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        block_out_channels: Sequence[int] = (64, 128),
        layers_per_block: int = 1,
        cross_attention: Sequence[bool] = (True, True),
        num_heads: int | Sequence[int] | None = None,
        head_dim: int | None = None,
        transformer_depth: int = 1,
        context_dim: int = 384,
        use_linear_projection: bool = False,
        norm_num_groups: int = 32,
        gradient_checkpointing: bool = False,
    ):
        """Build the UNet; give num_heads (per level or shared) or head_dim, not both (neither: 8 heads).

        cross_attention says per encoder level whether it has spatial transformers; the decoder
        mirrors it and the middle block always has one.
        """
        super().__init__()
        channels = tuple(block_out_channels)
        levels = len(channels)
        cross_attention = tuple(bool(a) for a in cross_attention)
        if len(cross_attention) != levels:
            raise ValueError(f"cross_attention has {len(cross_attention)} entries, expected {levels}")
        for c in channels:
            if c % norm_num_groups:
                raise ValueError(f"block_out_channels entry {c} is not divisible by norm_num_groups={norm_num_groups}")
        if num_heads is not None and head_dim is not None:
            raise ValueError("set either num_heads or head_dim, not both")
        if head_dim is not None:
            bad = [c for c in channels if c % head_dim]
            if bad:
                raise ValueError(f"block_out_channels {bad} are not divisible by head_dim={head_dim}")
            heads = tuple(c // head_dim for c in channels)
        else:
            heads = _per_level(DEFAULT_NUM_HEADS if num_heads is None else num_heads, levels, "num_heads")
            bad = [c for c, n in zip(channels, heads) if c % n]
            if bad:
                raise ValueError(f"block_out_channels {bad} are not divisible by their num_heads {heads}")
        self.config: dict[str, Any] = dict(
            in_channels=in_channels, out_channels=out_channels, block_out_channels=channels,
            layers_per_block=layers_per_block, cross_attention=cross_attention,
            num_heads=None if num_heads is None else (num_heads if isinstance(num_heads, int) else tuple(num_heads)),
            head_dim=head_dim, transformer_depth=transformer_depth, context_dim=context_dim,
            use_linear_projection=use_linear_projection, norm_num_groups=norm_num_groups,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.heads_per_level = heads

        def attention(level: int) -> dict[str, Any]:
            """Spatial-transformer kwargs at one level."""
            return dict(
                num_heads=heads[level], head_dim=channels[level] // heads[level], context_dim=context_dim,
                depth=transformer_depth, norm_num_groups=norm_num_groups,
                use_linear_projection=use_linear_projection,
            )

        temb_dim = channels[0] * 4
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.time_proj = SinusoidalTimesteps(channels[0])
        self.time_embedding = TimestepEmbedding(channels[0], temb_dim)

        self.down_blocks = nn.ModuleList()
        for level, out_ch in enumerate(channels):
            self.down_blocks.append(DownBlock(
                channels[max(level - 1, 0)], out_ch, temb_dim, layers_per_block, norm_num_groups,
                attention(level) if cross_attention[level] else None, add_downsample=level < levels - 1,
            ))
        self.mid_block = MidBlock(channels[-1], temb_dim, norm_num_groups, attention(levels - 1))
        self.up_blocks = nn.ModuleList()
        for i in range(levels):
            level = levels - 1 - i
            self.up_blocks.append(UpBlock(
                channels[min(level + 1, levels - 1)], channels[level], channels[max(level - 1, 0)], temb_dim,
                layers_per_block + 1, norm_num_groups, attention(level) if cross_attention[level] else None,
                add_upsample=level > 0,
            ))
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, channels[0], eps=1e-5)
        self.conv_out = nn.Conv2d(channels[0], out_channels, 3, padding=1)
        self.set_gradient_checkpointing(gradient_checkpointing)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute resnet and transformer activations in backward instead of storing them."""
        self.gradient_checkpointing = enabled
        self.config["gradient_checkpointing"] = enabled
        for block in [*self.down_blocks, self.mid_block, *self.up_blocks]:
            block.gradient_checkpointing = enabled

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict from x (B, C, H, W), timesteps t (B,) or scalar, context (B, L, D), mask (B, L) True=token."""
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.reshape(1).expand(b)  # (B,)
        if t.shape != (b,):
            raise ValueError(f"t must be a scalar or have shape ({b},), got {tuple(t.shape)}")
        temb = self.time_embedding(self.time_proj(t).to(x.dtype))  # (B, 4*C0)
        context, context_mask = drop_padding(context, context_mask)

        h = self.conv_in(x)  # (B, C0, H, W)
        skips = [h]
        for block in self.down_blocks:
            h, states = block(h, temb, context, context_mask)  # (B, Ci, H_i, W_i)
            skips.extend(states)
        h = self.mid_block(h, temb, context, context_mask)  # (B, C_last, H_last, W_last)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[-2:]) if skips else None  # the next level's resolution
            h = block(h, block_skips, temb, context, context_mask, size)  # (B, Ci, H_{i-1}, W_{i-1})
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out_channels, H, W)

    def to_diffusers_config(self) -> dict[str, Any]:
        """Keyword arguments for diffusers' UNet2DConditionModel with the same modules and shapes."""
        cfg = self.config
        cross = cfg["cross_attention"]
        return dict(
            in_channels=cfg["in_channels"],
            out_channels=cfg["out_channels"],
            block_out_channels=list(cfg["block_out_channels"]),
            layers_per_block=cfg["layers_per_block"],
            down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cross],
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cross)],
            # diffusers' 2D UNet reads attention_head_dim as the number of heads (a legacy name).
            attention_head_dim=list(self.heads_per_level),
            transformer_layers_per_block=cfg["transformer_depth"],
            cross_attention_dim=cfg["context_dim"],
            use_linear_projection=cfg["use_linear_projection"],
            norm_num_groups=cfg["norm_num_groups"],
            norm_eps=1e-5,
            act_fn="silu",
            flip_sin_to_cos=True,
            freq_shift=0,
            downsample_padding=1,
            mid_block_scale_factor=1.0,
        )

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any], **overrides: Any) -> "UNet":
        """Build a UNet with the shapes of a diffusers UNet2DConditionModel config (e.g. SD 1.x/2.x)."""
        fixed = dict(
            flip_sin_to_cos=True, freq_shift=0, act_fn="silu", norm_eps=1e-5, downsample_padding=1,
            mid_block_scale_factor=1, mid_block_type="UNetMidBlock2DCrossAttn", num_attention_heads=None,
            center_input_sample=False, only_cross_attention=False, class_embed_type=None,
            addition_embed_type=None, encoder_hid_dim=None, time_embedding_type="positional",
            resnet_time_scale_shift="default", dual_cross_attention=False, num_class_embeds=None,
        )
        for key, expected in fixed.items():
            if key in config and config[key] != expected:
                raise ValueError(f"diffusers config {key}={config[key]!r} is not supported (need {expected!r})")
        down = list(config["down_block_types"])
        cross = [kind == "CrossAttnDownBlock2D" for kind in down]
        mirrored = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cross)]
        if list(config["up_block_types"]) != mirrored or not set(down) <= {"CrossAttnDownBlock2D", "DownBlock2D"}:
            raise ValueError(f"block types {down} / {config['up_block_types']} are not a mirrored SD layout")
        depth = config.get("transformer_layers_per_block", 1)
        if not isinstance(depth, int):
            raise ValueError("per-level transformer_layers_per_block is not supported")
        heads = config.get("attention_head_dim", DEFAULT_NUM_HEADS)
        kwargs = dict(
            in_channels=config.get("in_channels", 4), out_channels=config.get("out_channels", 4),
            block_out_channels=tuple(config["block_out_channels"]),
            layers_per_block=config.get("layers_per_block", 2), cross_attention=tuple(cross),
            num_heads=heads if isinstance(heads, int) else tuple(heads), transformer_depth=depth,
            context_dim=config.get("cross_attention_dim", 1280),
            use_linear_projection=config.get("use_linear_projection", False),
            norm_num_groups=config.get("norm_num_groups", 32),
        )
        kwargs.update(overrides)
        return cls(**kwargs)
