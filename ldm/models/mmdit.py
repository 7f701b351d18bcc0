"""Stable Diffusion 3's multimodal diffusion transformer, MMDiT (Esser et al. 2024, Sec. 4 and Fig. 2):
(x_t, t, context, context_mask, pooled) -> prediction with the shape of x_t, like the UNet.

Image patches (``PatchEmbed``, SD3's positions: the centre crop of a ``pos_embed_max_size`` grid, any height and
width up to it) and text tokens (``context_embedder``, a linear pre-projection of the encoder's tokens) keep separate
weights but attend jointly: each block projects both streams to queries, keys and values and runs one attention
over the concatenated sequence. The timestep embedding plus an MLP of the pooled text vector (``time_text_embed``)
modulates every layer norm (adaLN-Zero: shift, scale and gate for attention and MLP, per stream). The last block is
"context pre-only": the text stream only supplies keys and values, so its text queries, text output projection and
text MLP do not exist or are not computed. The text mask (True = token) masks text keys; image keys are always
attended. SD3 itself attends to every text position (its pipelines pass no mask).

Module and parameter names follow diffusers' ``SD3Transformer2DModel`` (pos_embed.proj, time_text_embed,
context_embedder, transformer_blocks.{k}.{norm1, norm1_context, attn, ff, ff_context}, norm_out, proj_out), so its
state dicts load strictly. diffusers stores SD3's position table as a buffer (``pos_embed.pos_embed``); here it is
computed, checked against the stored one on loading, and added back by ``diffusers_state_dict`` for saving.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.models.attention import FeedForward, drop_padding
from ldm.models.dit import FREQUENCY_DIM, BlockStack, check_latent, check_width, layer_norm, unpatchify
from ldm.models.embeddings import PatchEmbed, ProjectionMLP, SinusoidalTimesteps, TimestepEmbedding, batch_timesteps


class Modulation(nn.Module):
    """adaLN: n vectors (B, 1, D) from one linear map of SiLU(conditioning) (diffusers' norm ``.linear``)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split linear(silu(emb (B, D))) into n chunks of (B, 1, D)."""
        return self.linear(F.silu(emb))[:, None].chunk(self.n, dim=-1)


class TimeTextEmbedding(nn.Module):
    """The conditioning vector: MLP of the timestep's sinusoidal features plus MLP of the pooled text vector."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.time_proj = SinusoidalTimesteps(FREQUENCY_DIM)
        self.timestep_embedder = TimestepEmbedding(FREQUENCY_DIM, dim)
        self.text_embedder = ProjectionMLP(pooled_dim, dim, "silu")

    def forward(self, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Embed t (B,) and pooled (B, P) as (B, D)."""
        return self.timestep_embedder(self.time_proj(t).to(pooled.dtype)) + self.text_embedder(pooled)  # (B, D)


class JointAttention(nn.Module):
    """One attention over [image tokens, text tokens], each stream with its own projections (to_* / add_*_proj)."""

    def __init__(self, dim: int, num_heads: int, context_pre_only: bool = False):
        super().__init__()
        self.num_heads, self.context_pre_only = num_heads, context_pre_only
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        # The last block's add_q_proj exists (diffusers' layout) but is not used: no text query's output is read.
        self.add_q_proj, self.add_k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_v_proj = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.to_add_out = None if context_pre_only else nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor,
                context_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from image tokens x (B, N, D) (and text tokens c (B, L, D) unless pre-only) to both."""
        b, n, dim = x.shape
        h = self.num_heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, y.shape[1], h, dim // h).transpose(1, 2)  # (B, h, T, d), a view

        # the streams are joined along the tokens before the heads are split: whole rows are copied, not strided heads
        k = split(torch.cat([self.to_k(x), self.add_k_proj(c)], dim=1))  # (B, h, N + L, d)
        v = split(torch.cat([self.to_v(x), self.add_v_proj(c)], dim=1))  # (B, h, N + L, d)
        if self.context_pre_only:
            q = split(self.to_q(x))  # (B, h, N, d)
        else:
            q = split(torch.cat([self.to_q(x), self.add_q_proj(c)], dim=1))  # (B, h, N + L, d)
        mask = None
        if context_mask is not None:
            image = torch.ones(b, n, dtype=torch.bool, device=context_mask.device)  # (B, N)
            mask = torch.cat([image, context_mask.bool()], dim=1)[:, None, None, :]  # (B, 1, 1, N + L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, N [+ L], d)
        out = out.transpose(1, 2).reshape(b, -1, dim)  # (B, N [+ L], D)
        if self.context_pre_only:
            return self.to_out[0](out), None  # (B, N, D)
        return self.to_out[0](out[:, :n]), self.to_add_out(out[:, n:])  # (B, N, D), (B, L, D)


class MMDiTBlock(nn.Module):
    """Joint attention and per-stream MLPs, each modulated by the conditioning vector (adaLN-Zero, both streams)."""

    def __init__(self, dim: int, num_heads: int, context_pre_only: bool = False):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = Modulation(dim, 6)
        # pre-only: the text stream needs only its normalised tokens (scale, shift), as in AdaLayerNormContinuous
        self.norm1_context = Modulation(dim, 2 if context_pre_only else 6)
        self.attn = JointAttention(dim, num_heads, context_pre_only)
        self.ff = FeedForward(dim, activation="gelu_tanh")
        self.ff_context = None if context_pre_only else FeedForward(dim, activation="gelu_tanh")

    def forward(self, x: torch.Tensor, c: torch.Tensor, emb: torch.Tensor,
                context_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Update image tokens x (B, N, D) and text tokens c (B, L, D) (None after a pre-only block)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(emb)  # 6 x (B, 1, D)
        if self.context_pre_only:
            c_scale, c_shift = self.norm1_context(emb)  # 2 x (B, 1, D)
            c_normed = layer_norm(c) * (1 + c_scale) + c_shift  # (B, L, D)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(emb)
            c_normed = layer_norm(c) * (1 + c_scale_msa) + c_shift_msa  # (B, L, D)
        attn_x, attn_c = self.attn(layer_norm(x) * (1 + scale_msa) + shift_msa, c_normed, context_mask)
        x = x + gate_msa * attn_x  # (B, N, D)
        x = x + gate_mlp * self.ff(layer_norm(x) * (1 + scale_mlp) + shift_mlp)  # (B, N, D)
        if self.context_pre_only:
            return x, None
        c = c + c_gate_msa * attn_c  # (B, L, D)
        c = c + c_gate_mlp * self.ff_context(layer_norm(c) * (1 + c_scale_mlp) + c_shift_mlp)  # (B, L, D)
        return x, c


class MMDiT(BlockStack):
    """SD3 MMDiT: (x_t, t, context, context_mask, pooled) -> prediction (B, out_channels, H, W)."""

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int | None = None,
        hidden_size: int = 384,
        num_heads: int = 6,
        num_layers: int = 6,
        patch_size: int = 2,
        context_dim: int = 384,
        pooled_dim: int = 384,
        sample_size: int = 32,
        pos_embed_max_size: int | None = 64,
        gradient_checkpointing: bool = False,
    ):
        """hidden_size is the width of both streams, split over num_heads; context_dim and pooled_dim are the text
        encoder's token and pooled widths. Positions are laid out for sample_size (the trained latent side); a latent
        may have up to pos_embed_max_size patches per side (None: PixArt's stretched positions, any size)."""
        super().__init__()
        check_width(hidden_size, num_heads, patch_size)
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if sample_size % patch_size:
            raise ValueError(f"sample_size={sample_size} is not a multiple of patch_size={patch_size}")
        if pos_embed_max_size is not None and pos_embed_max_size * patch_size < sample_size:
            raise ValueError(f"pos_embed_max_size={pos_embed_max_size} patches do not cover sample_size={sample_size}")
        out_channels = in_channels if out_channels is None else out_channels
        self.config: dict[str, Any] = dict(
            in_channels=in_channels, out_channels=out_channels, hidden_size=hidden_size, num_heads=num_heads,
            num_layers=num_layers, patch_size=patch_size, context_dim=context_dim, pooled_dim=pooled_dim,
            sample_size=sample_size, pos_embed_max_size=pos_embed_max_size,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.pos_embed = PatchEmbed(in_channels, hidden_size, patch_size, sample_size // patch_size,
                                    max_size=pos_embed_max_size)
        self.time_text_embed = TimeTextEmbedding(hidden_size, pooled_dim)
        self.context_embedder = nn.Linear(context_dim, hidden_size)
        self.transformer_blocks = nn.ModuleList(
            [MMDiTBlock(hidden_size, num_heads, context_pre_only=i == num_layers - 1) for i in range(num_layers)])
        self.norm_out = Modulation(hidden_size, 2)
        self.proj_out = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.initialize_weights()
        self.gradient_checkpointing = gradient_checkpointing

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's initialisation (Peebles & Xie 2023, Sec. 3.2): Xavier-uniform linear layers (the patch projection as
        one), N(0, 0.02) for the timestep MLP, zeros for every modulation (adaLN-Zero: each block starts as the
        identity) and for the final projection."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.pos_embed.proj.weight.view(self.pos_embed.proj.weight.shape[0], -1))
        nn.init.zeros_(self.pos_embed.proj.bias)
        nn.init.normal_(self.time_text_embed.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_text_embed.timestep_embedder.linear_2.weight, std=0.02)
        for module in self.modules():
            if isinstance(module, Modulation):
                nn.init.zeros_(module.linear.weight)
        nn.init.zeros_(self.proj_out.weight)

    micro_conditioned = False  # no size/crop time ids (the pooled text vector is always needed)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict from x (B, C, H, W), timesteps t (B,) or scalar, context (B, L, D), mask (B, L) True = token and
        the pooled text vector (B, P), which is required; time_ids are not used (the interface passes them)."""
        cfg = self.config
        p = cfg["patch_size"]
        check_latent(x, p, context, cfg["context_dim"])
        b, rows, cols = x.shape[0], x.shape[-2] // p, x.shape[-1] // p
        if pooled is None or pooled.shape != (b, cfg["pooled_dim"]):
            got = None if pooled is None else tuple(pooled.shape)
            raise ValueError(f"the MMDiT needs the pooled text vector ({b}, pooled_dim={cfg['pooled_dim']}), got {got}")
        t = batch_timesteps(t, b, x.device)  # (B,)
        context, context_mask = drop_padding(context, context_mask)

        h = self.pos_embed(x)  # (B, N, D), N = rows * cols
        emb = self.time_text_embed(t, pooled.to(h.dtype))  # (B, D)
        c = self.context_embedder(context)  # (B, L, D)
        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h, c = checkpoint(block, h, c, emb, context_mask, use_reentrant=False)  # (B, N, D), (B, L, D)
            else:
                h, c = block(h, c, emb, context_mask)  # (B, N, D), (B, L, D) or None after the last
        scale, shift = self.norm_out(emb)  # 2 x (B, 1, D)
        h = self.proj_out(layer_norm(h) * (1 + scale) + shift)  # (B, N, p * p * C_out)
        return unpatchify(h, rows, cols, p)  # (B, C_out, H, W)

    def diffusers_state_dict(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Our (or the given) weights plus the position table diffusers stores (``pos_embed.pos_embed``)."""
        state = dict(self.state_dict() if state is None else state)
        if self.config["pos_embed_max_size"] is not None:
            m = self.config["pos_embed_max_size"]
            state["pos_embed.pos_embed"] = self.pos_embed.table(m, m)[None]  # (1, m * m, D)
        return state

    def to_diffusers_config(self) -> dict[str, Any]:
        """Keyword arguments for diffusers' SD3Transformer2DModel with the same modules and shapes."""
        cfg = self.config
        return dict(
            sample_size=cfg["sample_size"], patch_size=cfg["patch_size"], in_channels=cfg["in_channels"],
            num_layers=cfg["num_layers"], attention_head_dim=cfg["hidden_size"] // cfg["num_heads"],
            num_attention_heads=cfg["num_heads"], joint_attention_dim=cfg["context_dim"],
            caption_projection_dim=cfg["hidden_size"], pooled_projection_dim=cfg["pooled_dim"],
            out_channels=cfg["out_channels"], pos_embed_max_size=cfg["pos_embed_max_size"],
            dual_attention_layers=(), qk_norm=None,
        )

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any], **overrides: Any) -> "MMDiT":
        """Build an MMDiT with the shapes of a diffusers SD3Transformer2DModel config (SD3; not SD3.5's dual attention
        or query-key norms)."""
        if tuple(config.get("dual_attention_layers") or ()) or config.get("qk_norm") is not None:
            raise ValueError("diffusers config with dual_attention_layers or qk_norm (SD3.5) is not supported")
        heads, head_dim = config.get("num_attention_heads", 18), config.get("attention_head_dim", 64)
        if config.get("caption_projection_dim", heads * head_dim) != heads * head_dim:
            raise ValueError(f"diffusers config caption_projection_dim={config['caption_projection_dim']} must equal "
                             f"the width {heads * head_dim} (joint attention)")
        kwargs = dict(
            in_channels=config.get("in_channels", 16), out_channels=config.get("out_channels", 16),
            hidden_size=heads * head_dim, num_heads=heads, num_layers=config.get("num_layers", 18),
            patch_size=config.get("patch_size", 2), context_dim=config.get("joint_attention_dim", 4096),
            pooled_dim=config.get("pooled_projection_dim", 2048), sample_size=config.get("sample_size", 128),
            pos_embed_max_size=config.get("pos_embed_max_size", 96),
        )
        return cls(**{**kwargs, **overrides})
