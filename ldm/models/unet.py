"""Text-conditioned UNet for latent diffusion (Rombach et al. 2022, Sec. 3.3 and Appendix E.2), SD and SDXL shapes.

ResNet blocks take the sinusoidal timestep embedding (Ho et al. 2020); spatial transformers
cross-attend to text token embeddings. The module tree and parameter names mirror diffusers'
``UNet2DConditionModel`` (conv_in, time_embedding, down_blocks, mid_block, up_blocks,
conv_norm_out, conv_out), so ``load_state_dict`` takes its weights strictly and
``to_diffusers_config`` gives the matching diffusers constructor arguments.

SDXL's additional conditioning (Podell et al. 2023, Sec. 2.2; diffusers ``addition_embed_type="text_time"``):
with ``addition_time_embed_dim`` and ``pooled_dim`` set, each of the ``num_time_ids`` micro-conditions
(original height/width, crop top/left, target height/width) gets sinusoidal features (``add_time_proj``),
they are concatenated after the pooled text embedding and mapped by a two-layer MLP (``add_embedding``)
to the width of the timestep embedding, to which they are added.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.attention import TransformerBlock, drop_padding
from ldm.models.blocks import DownBlock, MidBlock, ResnetBlock, UpBlock
from ldm.models.embeddings import SinusoidalTimesteps, TimestepEmbedding

DEFAULT_NUM_HEADS = 8


def _per_level(value: int | Sequence[int], levels: int, name: str) -> tuple[int, ...]:
    """Broadcast an int to one value per level, or check a sequence has one per level."""
    values = (value,) * levels if isinstance(value, int) else tuple(value)
    if len(values) != levels:
        raise ValueError(f"{name} has {len(values)} entries, expected one per level ({levels})")
    return values


def micro_conditioned(config: Mapping[str, Any]) -> bool:
    """True when a UNet of these constructor arguments (its ``config``) embeds SDXL's size/crop ids (``time_ids``)."""
    return config.get("addition_time_embed_dim") is not None


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
        transformer_depth: int | Sequence[int] = 1,
        context_dim: int = 384,
        use_linear_projection: bool = False,
        norm_num_groups: int = 32,
        gradient_checkpointing: bool = False,
        pooled_dim: int | None = None,
        addition_time_embed_dim: int | None = None,
        num_time_ids: int = 6,
    ):
        """Build the UNet; give num_heads (per level or shared) or head_dim, not both (neither: 8 heads).

        cross_attention says per encoder level whether it has spatial transformers; the decoder
        mirrors it and the middle block always has one. transformer_depth is shared or per encoder
        level (the decoder mirrors it, the middle block takes the last level's, as in SDXL).
        pooled_dim and addition_time_embed_dim (set both or neither) add SDXL's pooled-text and
        size/crop conditioning; forward then needs ``pooled`` (B, pooled_dim) and ``time_ids`` (B, num_time_ids).
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
        depths = _per_level(transformer_depth, levels, "transformer_depth")
        if (pooled_dim is None) != (addition_time_embed_dim is None):
            raise ValueError("set both pooled_dim and addition_time_embed_dim (SDXL conditioning) or neither")
        self.config: dict[str, Any] = dict(
            in_channels=in_channels, out_channels=out_channels, block_out_channels=channels,
            layers_per_block=layers_per_block, cross_attention=cross_attention,
            num_heads=None if num_heads is None else (num_heads if isinstance(num_heads, int) else tuple(num_heads)),
            head_dim=head_dim,
            transformer_depth=transformer_depth if isinstance(transformer_depth, int) else depths,
            context_dim=context_dim, use_linear_projection=use_linear_projection, norm_num_groups=norm_num_groups,
            gradient_checkpointing=gradient_checkpointing, pooled_dim=pooled_dim,
            addition_time_embed_dim=addition_time_embed_dim, num_time_ids=num_time_ids,
        )
        self.heads_per_level = heads

        def attention(level: int) -> dict[str, Any]:
            """Spatial-transformer kwargs at one level."""
            return dict(
                num_heads=heads[level], head_dim=channels[level] // heads[level], context_dim=context_dim,
                depth=depths[level], norm_num_groups=norm_num_groups,
                use_linear_projection=use_linear_projection,
            )

        temb_dim = channels[0] * 4
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.time_proj = SinusoidalTimesteps(channels[0])
        self.time_embedding = TimestepEmbedding(channels[0], temb_dim)
        if addition_time_embed_dim is not None:
            self.add_time_proj = SinusoidalTimesteps(addition_time_embed_dim)
            self.add_embedding = TimestepEmbedding(pooled_dim + num_time_ids * addition_time_embed_dim, temb_dim)

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

    @property
    def micro_conditioned(self) -> bool:
        """True when forward needs SDXL's size/crop ``time_ids`` (and the pooled text vector)."""
        return micro_conditioned(self.config)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute resnet and transformer activations in backward instead of storing them."""
        self.gradient_checkpointing = enabled
        self.config["gradient_checkpointing"] = enabled
        for block in [*self.down_blocks, self.mid_block, *self.up_blocks]:
            block.gradient_checkpointing = enabled

    def compile_blocks(self, **options: Any) -> int:
        """Regional compilation: ``torch.compile(**options)`` each ResNet block and transformer block in place (blocks
        of one class and shape share one compiled graph); names and state dicts stay the same. Returns how many."""
        blocks = [m for m in self.modules() if isinstance(m, (ResnetBlock, TransformerBlock))]
        for block in blocks:
            block.compile(**options)
        return len(blocks)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict from x (B, C, H, W), timesteps t (B,) or scalar, context (B, L, D), mask (B, L) True=token.

        pooled (B, P) and time_ids (B, num_time_ids) or (num_time_ids,) are SDXL's additional conditions:
        required when the UNet was built with them, ignored otherwise.
        """
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.reshape(1).expand(b)  # (B,)
        if t.shape != (b,):
            raise ValueError(f"t must be a scalar or have shape ({b},), got {tuple(t.shape)}")
        temb = self.time_embedding(self.time_proj(t).to(x.dtype))  # (B, 4*C0)
        if self.config["addition_time_embed_dim"] is not None:
            temb = temb + self.added_embedding(pooled, time_ids, b, temb.dtype)  # (B, 4*C0)
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

    def added_embedding(
        self, pooled: torch.Tensor | None, time_ids: torch.Tensor | None, batch: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """SDXL's embedding of [pooled text, sinusoidal features of each time id] -> (B, 4*C0)."""
        n, p = self.config["num_time_ids"], self.config["pooled_dim"]
        if pooled is None or time_ids is None:
            raise ValueError("this UNet has SDXL conditioning: forward needs pooled and time_ids")
        time_ids = torch.as_tensor(time_ids, device=pooled.device)
        if pooled.shape != (batch, p) or time_ids.shape not in ((n,), (1, n), (batch, n)):
            raise ValueError(f"pooled must be ({batch}, {p}) and time_ids ({batch}, {n}), "
                             f"got {tuple(pooled.shape)} and {tuple(time_ids.shape)}")
        time_ids = time_ids.reshape(-1, n).expand(batch, n)  # (B, n)
        features = self.add_time_proj(time_ids.reshape(-1)).reshape(batch, -1)  # (B, n * A)
        return self.add_embedding(torch.cat([pooled.to(dtype), features.to(dtype)], dim=-1))  # (B, 4*C0)

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
            transformer_layers_per_block=depth if isinstance(depth := cfg["transformer_depth"], int) else list(depth),
            cross_attention_dim=cfg["context_dim"],
            use_linear_projection=cfg["use_linear_projection"],
            norm_num_groups=cfg["norm_num_groups"],
            norm_eps=1e-5,
            act_fn="silu",
            flip_sin_to_cos=True,
            freq_shift=0,
            downsample_padding=1,
            mid_block_scale_factor=1.0,
            **self._diffusers_addition_config(),
        )

    def _diffusers_addition_config(self) -> dict[str, Any]:
        """diffusers' "text_time" additional-embedding arguments (empty without SDXL conditioning)."""
        cfg = self.config
        if cfg["addition_time_embed_dim"] is None:
            return {}
        inputs = cfg["pooled_dim"] + cfg["num_time_ids"] * cfg["addition_time_embed_dim"]
        return dict(addition_embed_type="text_time", addition_time_embed_dim=cfg["addition_time_embed_dim"],
                    projection_class_embeddings_input_dim=inputs)

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any], **overrides: Any) -> "UNet":
        """Build a UNet with the shapes of a diffusers UNet2DConditionModel config (SD 1.x/2.x, SDXL).

        For ``addition_embed_type="text_time"`` the pooled width is the projection input less 6 time ids
        (SDXL base); pass ``num_time_ids`` (e.g. 5 for the SDXL refiner) to split it otherwise.
        """
        fixed = dict(
            flip_sin_to_cos=True, freq_shift=0, act_fn="silu", norm_eps=1e-5, downsample_padding=1,
            mid_block_scale_factor=1, mid_block_type="UNetMidBlock2DCrossAttn", num_attention_heads=None,
            center_input_sample=False, only_cross_attention=False, class_embed_type=None,
            encoder_hid_dim=None, reverse_transformer_layers_per_block=None, time_embedding_type="positional",
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
        addition = config.get("addition_embed_type")
        if addition not in (None, "text_time"):
            raise ValueError(f"diffusers config addition_embed_type={addition!r} is not supported (need None or 'text_time')")
        depth = config.get("transformer_layers_per_block", 1)
        if not isinstance(depth, int) and not all(isinstance(d, int) for d in depth):
            raise ValueError("transformer_layers_per_block must be an int or one int per level (not per layer)")
        heads = config.get("attention_head_dim", DEFAULT_NUM_HEADS)
        kwargs = dict(
            in_channels=config.get("in_channels", 4), out_channels=config.get("out_channels", 4),
            block_out_channels=tuple(config["block_out_channels"]),
            layers_per_block=config.get("layers_per_block", 2), cross_attention=tuple(cross),
            num_heads=heads if isinstance(heads, int) else tuple(heads),
            transformer_depth=depth if isinstance(depth, int) else tuple(depth),
            context_dim=config.get("cross_attention_dim", 1280),
            use_linear_projection=config.get("use_linear_projection", False),
            norm_num_groups=config.get("norm_num_groups", 32),
        )
        if addition == "text_time":
            time_dim, n = config["addition_time_embed_dim"], overrides.get("num_time_ids", 6)
            pooled = config["projection_class_embeddings_input_dim"] - n * time_dim
            if pooled < 1:
                raise ValueError(f"projection_class_embeddings_input_dim leaves no pooled width for {n} time ids")
            kwargs.update(pooled_dim=pooled, addition_time_embed_dim=time_dim, num_time_ids=n)
        kwargs.update(overrides)
        return cls(**kwargs)
