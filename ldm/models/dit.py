"""PixArt-alpha's diffusion transformer with text cross-attention (Chen et al. 2023, Sec. 2.3), built on DiT
(Peebles & Xie 2023): (x_t, t, context) -> prediction with the shape of x_t, like the UNet.

Latents are cut into p x p patches with 2-D sin-cos positions computed for their own height and width
(``PatchEmbed``), so non-square and bucketed batches work. Every block runs self-attention, cross-attention to the
projected text tokens under the text mask, and an MLP. The timestep modulates the blocks by adaLN-single: one MLP
of the timestep embedding (``adaln_single``) gives six vectors (shift, scale, gate for attention and MLP) that every
block shares, each block adding its own learned ``scale_shift_table``; the final layer is a modulated layer norm
and a linear map back to patches. PixArt's 1024-px models add the image's size and aspect ratio to the timestep
embedding (``size_conditioning``); they are read from SDXL-style micro-conditions ``time_ids`` (B, 6) = (original
h, w, crop top, left, target h, w): resolution = original (h, w), aspect ratio = target h / target w.

Module and parameter names follow diffusers' ``PixArtTransformer2DModel`` (pos_embed.proj, adaln_single,
caption_projection, transformer_blocks.{k}.{scale_shift_table, attn1, attn2, ff}, scale_shift_table, proj_out), so
its state dicts load strictly; ``to_diffusers_config`` / ``from_diffusers_config`` map the constructor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.models.attention import Attention, FeedForward, drop_padding
from ldm.models.embeddings import (
    PatchEmbed,
    ProjectionMLP,
    SinusoidalTimesteps,
    TimestepEmbedding,
    batch_timesteps,
)

FREQUENCY_DIM = 256  # sinusoidal features of the timestep (and of each size condition)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """Layer norm without affine parameters (eps 1e-6), the norm of every DiT and MMDiT layer."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def unpatchify(tokens: torch.Tensor, rows: int, cols: int, p: int) -> torch.Tensor:
    """Tokens (B, rows * cols, p * p * C) back to latents (B, C, rows * p, cols * p)."""
    b = tokens.shape[0]
    x = tokens.reshape(b, rows, cols, p, p, -1)  # (B, h, w, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, h, p, w, p)
    return x.reshape(b, x.shape[1], rows * p, cols * p)  # (B, C, H, W)


def check_latent(x: torch.Tensor, patch_size: int, context: torch.Tensor, context_dim: int) -> None:
    """One-line ValueErrors for a latent the patches do not tile and a context of the wrong width."""
    if x.ndim != 4 or x.shape[-2] % patch_size or x.shape[-1] % patch_size:
        raise ValueError(f"latent shape {tuple(x.shape)}: height and width must be multiples of "
                         f"patch_size={patch_size}")
    if context.ndim != 3 or context.shape[-1] != context_dim:
        raise ValueError(f"context shape {tuple(context.shape)}: expected (B, L, context_dim={context_dim}), the "
                         "text encoder's width")


def check_width(hidden_size: int, num_heads: int, patch_size: int) -> int:
    """The head width; ValueError naming the argument when the heads do not divide the width."""
    if num_heads < 1 or hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    return hidden_size // num_heads


class TimestepSizeEmbedding(nn.Module):
    """Timestep embedding, plus PixArt's resolution and aspect-ratio embeddings (D/3 wide each) when enabled."""

    def __init__(self, dim: int, size_conditioning: bool = False):
        super().__init__()
        self.time_proj = SinusoidalTimesteps(FREQUENCY_DIM)
        self.timestep_embedder = TimestepEmbedding(FREQUENCY_DIM, dim)
        self.size_conditioning = size_conditioning
        if size_conditioning:
            self.resolution_embedder = TimestepEmbedding(FREQUENCY_DIM, dim // 3)
            self.aspect_ratio_embedder = TimestepEmbedding(FREQUENCY_DIM, dim // 3)

    def forward(self, t: torch.Tensor, time_ids: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """Embed t (B,) [and time_ids (B, 6)] as (B, D)."""
        emb = self.timestep_embedder(self.time_proj(t).to(dtype))  # (B, D)
        if not self.size_conditioning:
            return emb
        b = t.shape[0]
        if time_ids is None:
            raise ValueError("this DiT has size conditioning (size_conditioning=True): forward needs time_ids (B, 6)")
        time_ids = torch.as_tensor(time_ids, device=t.device).reshape(-1, 6).expand(b, 6).float()  # (B, 6)
        resolution = time_ids[:, :2]  # (B, 2) original height, width in pixels
        aspect = time_ids[:, 4:5] / time_ids[:, 5:6]  # (B, 1) target height / width
        res = self.resolution_embedder(self.time_proj(resolution.flatten()).to(dtype)).reshape(b, -1)  # (B, 2D/3)
        ar = self.aspect_ratio_embedder(self.time_proj(aspect.flatten()).to(dtype)).reshape(b, -1)  # (B, D/3)
        return emb + torch.cat([res, ar], dim=1)  # (B, D)


class AdaLNSingle(nn.Module):
    """adaLN-single (PixArt-alpha Sec. 2.3): the six modulation vectors of every block from one MLP of the embedding."""

    def __init__(self, dim: int, size_conditioning: bool = False):
        super().__init__()
        self.emb = TimestepSizeEmbedding(dim, size_conditioning)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, t: torch.Tensor, time_ids: torch.Tensor | None,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(modulation (B, 6, D), embedding (B, D)) of timesteps t (B,)."""
        emb = self.emb(t, time_ids, dtype)  # (B, D)
        return self.linear(F.silu(emb)).unflatten(1, (6, -1)), emb  # (B, 6, D), (B, D)


class DiTBlock(nn.Module):
    """Modulated self-attention, cross-attention to the text, modulated MLP; residual around each."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        head_dim = dim // num_heads
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)
        self.attn1 = Attention(dim, num_heads, head_dim, bias=True)
        self.attn2 = Attention(dim, num_heads, head_dim, context_dim=dim, bias=True)
        self.ff = FeedForward(dim, activation="gelu_tanh")

    def forward(self, x: torch.Tensor, modulation: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None) -> torch.Tensor:
        """Update tokens x (B, N, D) given the shared modulation (B, 6, D) and text tokens (B, L, D)."""
        mod = self.scale_shift_table[None] + modulation  # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)  # 6 x (B, 1, D)
        x = x + gate_msa * self.attn1(layer_norm(x) * (1 + scale_msa) + shift_msa)  # (B, N, D)
        x = x + self.attn2(x, context, context_mask)  # (B, N, D)
        return x + gate_mlp * self.ff(layer_norm(x) * (1 + scale_mlp) + shift_mlp)  # (B, N, D)


class BlockStack(nn.Module):
    """What DiT and MMDiT share beyond their blocks: ``self.transformer_blocks`` run one after another, with
    activation checkpointing and regional compilation over them."""

    config: dict[str, Any]
    transformer_blocks: nn.ModuleList
    gradient_checkpointing: bool

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.gradient_checkpointing = enabled
        self.config["gradient_checkpointing"] = enabled

    def compile_blocks(self, **options: Any) -> int:
        """Regional compilation: ``torch.compile(**options)`` each transformer block in place. Returns how many."""
        for block in self.transformer_blocks:
            block.compile(**options)
        return len(self.transformer_blocks)


class DiT(BlockStack):
    """PixArt-alpha DiT: (x_t, t, context, context_mask) -> prediction (B, out_channels, H, W)."""

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int | None = None,
        hidden_size: int = 384,
        num_heads: int = 6,
        num_layers: int = 12,
        patch_size: int = 2,
        context_dim: int = 384,
        sample_size: int = 32,
        interpolation_scale: float = 1.0,
        size_conditioning: bool = False,
        gradient_checkpointing: bool = False,
    ):
        """hidden_size is the token width, split over num_heads; context_dim the text encoder's width (the caption
        projection maps it to hidden_size). sample_size is the latent side the positions are laid out for (every
        latent size spans sample_size / patch_size / interpolation_scale position units per axis). out_channels
        defaults to in_channels (PixArt's published models have 2 x in_channels: eps and a learned variance)."""
        super().__init__()
        check_width(hidden_size, num_heads, patch_size)
        if sample_size % patch_size:
            raise ValueError(f"sample_size={sample_size} is not a multiple of patch_size={patch_size}")
        if size_conditioning and hidden_size % 3:
            raise ValueError(f"hidden_size={hidden_size} must be a multiple of 3 with size_conditioning "
                             "(resolution and aspect ratio take a third each)")
        out_channels = in_channels if out_channels is None else out_channels
        self.config: dict[str, Any] = dict(
            in_channels=in_channels, out_channels=out_channels, hidden_size=hidden_size, num_heads=num_heads,
            num_layers=num_layers, patch_size=patch_size, context_dim=context_dim, sample_size=sample_size,
            interpolation_scale=interpolation_scale, size_conditioning=size_conditioning,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.pos_embed = PatchEmbed(in_channels, hidden_size, patch_size, sample_size // patch_size,
                                    interpolation_scale)
        self.adaln_single = AdaLNSingle(hidden_size, size_conditioning)
        self.caption_projection = ProjectionMLP(context_dim, hidden_size, "gelu_tanh")
        self.transformer_blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads) for _ in range(num_layers)])
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)
        self.proj_out = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.initialize_weights()
        self.gradient_checkpointing = gradient_checkpointing

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """PixArt-alpha's initialisation: Xavier-uniform linear layers (the patch projection as one), N(0, 0.02) for
        the timestep and caption MLPs, zeros for every cross-attention output and the final projection."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.pos_embed.proj.weight.view(self.pos_embed.proj.weight.shape[0], -1))
        nn.init.zeros_(self.pos_embed.proj.bias)
        timestep = self.adaln_single.emb.timestep_embedder
        for layer in (timestep.linear_1, timestep.linear_2, self.adaln_single.linear, self.caption_projection.linear_1,
                      self.caption_projection.linear_2):
            nn.init.normal_(layer.weight, std=0.02)
        for block in self.transformer_blocks:
            nn.init.zeros_(block.attn2.to_out[0].weight)
            nn.init.zeros_(block.attn2.to_out[0].bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    @property
    def micro_conditioned(self) -> bool:
        """True when forward needs the size/crop ``time_ids`` (PixArt's size conditioning)."""
        return self.config["size_conditioning"]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict from x (B, C, H, W), timesteps t (B,) or scalar, context (B, L, D), mask (B, L) True = token.

        time_ids (B, 6) feed the size conditioning when the DiT has it; pooled is not used (the denoiser interface
        passes it when the text encoder gives one)."""
        cfg = self.config
        p = cfg["patch_size"]
        check_latent(x, p, context, cfg["context_dim"])
        b, rows, cols = x.shape[0], x.shape[-2] // p, x.shape[-1] // p
        t = batch_timesteps(t, b, x.device)  # (B,)
        context, context_mask = drop_padding(context, context_mask)

        h = self.pos_embed(x)  # (B, N, D), N = rows * cols
        modulation, emb = self.adaln_single(t, time_ids, h.dtype)  # (B, 6, D), (B, D)
        text = self.caption_projection(context)  # (B, L, D)
        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, modulation, text, context_mask, use_reentrant=False)  # (B, N, D)
            else:
                h = block(h, modulation, text, context_mask)  # (B, N, D)
        shift, scale = (self.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)  # 2 x (B, 1, D)
        h = self.proj_out(layer_norm(h) * (1 + scale) + shift)  # (B, N, p * p * C_out)
        return unpatchify(h, rows, cols, p)  # (B, C_out, H, W)

    def to_diffusers_config(self) -> dict[str, Any]:
        """Keyword arguments for diffusers' PixArtTransformer2DModel with the same modules and shapes."""
        cfg = self.config
        return dict(
            num_attention_heads=cfg["num_heads"], attention_head_dim=cfg["hidden_size"] // cfg["num_heads"],
            in_channels=cfg["in_channels"], out_channels=cfg["out_channels"], num_layers=cfg["num_layers"],
            cross_attention_dim=cfg["hidden_size"], attention_bias=True, sample_size=cfg["sample_size"],
            patch_size=cfg["patch_size"], activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
            interpolation_scale=cfg["interpolation_scale"], use_additional_conditions=cfg["size_conditioning"],
            caption_channels=cfg["context_dim"],
        )

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any], **overrides: Any) -> "DiT":
        """Build a DiT with the shapes of a diffusers PixArtTransformer2DModel config (PixArt-alpha and -sigma)."""
        fixed = dict(attention_bias=True, activation_fn="gelu-approximate", norm_type="ada_norm_single",
                     norm_elementwise_affine=False, norm_eps=1e-6, upcast_attention=False, attention_type="default",
                     dropout=0.0)
        for key, expected in fixed.items():
            if key in config and config[key] != expected:
                raise ValueError(f"diffusers config {key}={config[key]!r} is not supported (need {expected!r})")
        if config.get("caption_channels") is None:
            raise ValueError("diffusers config caption_channels=None is not supported (the DiT projects the text)")
        heads, head_dim = config.get("num_attention_heads", 16), config.get("attention_head_dim", 72)
        if config.get("cross_attention_dim", heads * head_dim) != heads * head_dim:
            raise ValueError(f"diffusers config cross_attention_dim={config['cross_attention_dim']} must equal the "
                             f"width {heads * head_dim} (the caption projection's output)")
        sample_size = config.get("sample_size", 128)
        interpolation = config.get("interpolation_scale")
        size_conditioning = config.get("use_additional_conditions")
        kwargs = dict(
            in_channels=config.get("in_channels", 4), out_channels=config.get("out_channels", 8),
            hidden_size=heads * head_dim, num_heads=heads, num_layers=config.get("num_layers", 28),
            patch_size=config.get("patch_size", 2), context_dim=config["caption_channels"], sample_size=sample_size,
            interpolation_scale=max(sample_size // 64, 1) if interpolation is None else interpolation,
            size_conditioning=sample_size == 128 if size_conditioning is None else size_conditioning,
        )
        return cls(**{**kwargs, **overrides})
