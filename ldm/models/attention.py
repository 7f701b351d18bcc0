"""Spatial transformer with cross-attention on text tokens (Rombach et al. 2022, Sec. 3.3).

The image features attend to themselves and then to the text tokens ``context``; the layout
(norm, proj_in, transformer_blocks.{k}.{norm1, attn1, norm2, attn2, norm3, ff}, proj_out) and the
parameter names follow diffusers' ``Transformer2DModel``, so its state dicts load unchanged.
Attention is ``torch.nn.functional.scaled_dot_product_attention`` throughout. The text mask reaches it as a
(B, 1, 1, L) boolean view broadcast over heads and queries (never expanded to (B, h, N, L)), a form its
memory-efficient CUDA kernel takes; unmasked self-attention can take the flash kernel.

Two layers compute diffusers' maps with the same parameters in a faster form: the GEGLU projection as two
matmuls (GatedProjection), SD 1.x's 1x1-convolution projections as matmuls on the tokens (TokenConv1x1).
Every layer computes with its own parameters inside its own forward (ZeRO-3 gathers them per module).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def drop_padding(
    context: torch.Tensor, context_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Remove context positions no sample attends to, and a mask that masks nothing (same result, less work).

    A masked key gets zero attention weight, so dropping the columns masked in every row is exact;
    with text padded to a fixed length this shortens cross-attention to the batch's longest prompt.
    Only where reading the mask is free: on the CPU, outside torch.compile. A GPU mask would have to be read by
    the host (waiting for the GPU every forward), and under compile its data-dependent shapes break the graph;
    there the mask is passed on as it is, which gives the same result (the padded keys get zero weight).
    """
    if context_mask is None or context_mask.device.type != "cpu" or torch.compiler.is_compiling():
        return context, context_mask
    keep = context_mask.bool().any(dim=0)  # (L,)
    if bool(keep.any()) and not bool(keep.all()):
        context, context_mask = context[:, keep], context_mask[:, keep]  # (B, L', D), (B, L')
    return context, (None if bool(context_mask.all()) else context_mask)


class Attention(nn.Module):
    """Multi-head attention of queries on themselves (self) or on a context (cross)."""

    def __init__(self, query_dim: int, num_heads: int, head_dim: int, context_dim: int | None = None,
                 bias: bool = False):
        """bias: biases on the query, key and value projections (the UNet has none, PixArt's DiT has them)."""
        super().__init__()
        inner_dim = num_heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.num_heads = num_heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=bias)
        # A ModuleList so the output projection is named to_out.0 like diffusers'; index 1 would
        # be its (parameter-free) dropout, which latent diffusion UNets do not use.
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim)])

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attend from x (B, N, C) to context (B, L, D), or to x itself when context is None."""
        context = x if context is None else context
        b, n, _ = x.shape
        h = self.num_heads
        q = self.to_q(x).view(b, n, h, -1).transpose(1, 2)  # (B, h, N, d)
        k = self.to_k(context).view(b, context.shape[1], h, -1).transpose(1, 2)  # (B, h, L, d)
        v = self.to_v(context).view(b, context.shape[1], h, -1).transpose(1, 2)  # (B, h, L, d)
        mask = None
        if context_mask is not None:
            mask = context_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, L), True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, N, d)
        out = out.transpose(1, 2).reshape(b, n, -1)  # (B, N, h*d)
        return self.to_out[0](out)  # (B, N, C)


class GatedProjection(nn.Linear):
    """A linear layer to 2 * dim_out features returned as two halves, each computed by its own matmul.

    Separate matmuls give contiguous halves: GELU on a contiguous gate takes the vectorised kernel (about
    twice as fast on CPU as on a strided half of one output), and backward needs no concatenation.
    """

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map x (..., in) to the first and second half of the projection, each (..., out / 2)."""
        d = self.out_features // 2
        return F.linear(x, self.weight[:d], self.bias[:d]), F.linear(x, self.weight[d:], self.bias[d:])


class GEGLU(nn.Module):
    """Gated GELU linear unit (Shazeer 2020): one projection gives value and gate."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = GatedProjection(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project x (..., dim_in) to (..., dim_out) as value * gelu(gate)."""
        value, gate = self.proj(x)  # 2 x (..., dim_out)
        return value * F.gelu(gate)


class TanhGELU(nn.Module):
    """A linear layer followed by the tanh approximation of GELU (diffusers' ``GELU(approximate="tanh")``)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (..., dim_in) to (..., dim_out)."""
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Feed-forward with 4x hidden width, named net.0.proj / net.2 like diffusers: GEGLU (the UNet) or a tanh-GELU
    MLP (``activation="gelu_tanh"``: the DiT and MMDiT blocks)."""

    def __init__(self, dim: int, mult: int = 4, activation: str = "geglu"):
        super().__init__()
        if activation not in ("geglu", "gelu_tanh"):
            raise ValueError(f"activation must be 'geglu' or 'gelu_tanh', got {activation!r}")
        first = GEGLU(dim, dim * mult) if activation == "geglu" else TanhGELU(dim, dim * mult)
        # Index 1 is the dropout slot in diffusers; Identity keeps the indices without parameters.
        self.net = nn.ModuleList([first, nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the feed-forward to x (..., dim)."""
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention on the context, GEGLU feed-forward."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, num_heads, head_dim, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Update tokens x (B, N, C) given context (B, L, D) and its mask (B, L)."""
        x = x + self.attn1(self.norm1(x))  # (B, N, C)
        x = x + self.attn2(self.norm2(x), context, context_mask)  # (B, N, C)
        return x + self.ff(self.norm3(x))  # (B, N, C)


class TokenConv1x1(nn.Conv2d):
    """A 1x1 convolution (SD 1.x proj_in/proj_out, same parameters) applied to tokens (B, N, C) as a matmul."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map tokens (B, N, in) to (B, N, out)."""
        return F.linear(x, self.weight.flatten(1), self.bias)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, residual around the whole stack."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        head_dim: int,
        context_dim: int,
        depth: int = 1,
        norm_num_groups: int = 32,
        use_linear_projection: bool = False,
    ):
        super().__init__()
        inner_dim = num_heads * head_dim
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=1e-6)
        # SD 2.x projects with linear layers, SD 1.x with 1x1 convolutions: the same map on each pixel.
        projection = nn.Linear if use_linear_projection else TokenConv1x1
        self.proj_in = projection(channels, inner_dim)
        self.proj_out = projection(inner_dim, channels)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(inner_dim, num_heads, head_dim, context_dim) for _ in range(depth)]
        )

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Map x (B, C, H, W) to the same shape, attending to context (B, L, D)."""
        b, c, height, width = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(b, height * width, c)  # (B, HW, C)
        h = self.proj_in(h)  # (B, HW, inner)
        for block in self.transformer_blocks:
            h = block(h, context, context_mask)  # (B, HW, inner)
        h = self.proj_out(h)  # (B, HW, C)
        return x + h.view(b, height, width, c).permute(0, 3, 1, 2)  # (B, C, H, W)
