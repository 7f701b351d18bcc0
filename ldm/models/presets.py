"""UNet size presets: name -> keyword arguments of ``ldm.models.unet.UNet``."""

from __future__ import annotations

from typing import Any

UNET_PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: two levels, a few hundred thousand parameters.
    "tiny": dict(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention=(True, True),
        num_heads=4, context_dim=32, norm_num_groups=8,
    ),
    # The CPU default: 32 px images -> 8x8x4 latents, all-MiniLM-L6-v2 token embeddings (384-d).
    # 4.6M parameters, ~20 GFLOP per forward+backward at batch 32 with 16 tokens: about 0.25 s on
    # 2 CPU cores; (96, 192) is 10M parameters and 43 GFLOP, about 0.5-0.6 s.
    "emoji-cpu": dict(
        block_out_channels=(64, 128), layers_per_block=1, cross_attention=(True, True),
        head_dim=32, context_dim=384, norm_num_groups=32,
    ),
    # Stable Diffusion 1.x shapes (860M parameters): 8 heads, CLIP ViT-L/14 context.
    "sd15": dict(
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        cross_attention=(True, True, True, False), num_heads=8, context_dim=768, norm_num_groups=32,
    ),
    # Stable Diffusion 2.x shapes: 64-d heads, OpenCLIP ViT-H/14 context, linear projections.
    "sd2": dict(
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        cross_attention=(True, True, True, False), head_dim=64, context_dim=1024,
        use_linear_projection=True, norm_num_groups=32,
    ),
    # Stable Diffusion XL base shapes (2.57B parameters): no attention at the first level, 1/2/10 transformer
    # blocks per level, context = CLIP ViT-L (768) + OpenCLIP ViT-bigG (1280) penultimate features, the bigG
    # pooled projection (1280) and 6 size/crop micro-conditions with 256 sinusoidal features each.
    "sdxl": dict(
        block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention=(False, True, True),
        head_dim=64, transformer_depth=(1, 2, 10), context_dim=2048, use_linear_projection=True,
        norm_num_groups=32, pooled_dim=1280, addition_time_embed_dim=256,
    ),
    # Unit tests: the SDXL layout (every SDXL-specific module) at 2M parameters.
    "tiny-sdxl": dict(
        block_out_channels=(16, 32, 64), layers_per_block=2, cross_attention=(False, True, True),
        head_dim=8, transformer_depth=(1, 1, 2), context_dim=64, use_linear_projection=True,
        norm_num_groups=8, pooled_dim=16, addition_time_embed_dim=8,
    ),
}


def unet_preset(name: str, **overrides: Any) -> dict[str, Any]:
    """Return a copy of a preset's kwargs with overrides applied; unknown names list the choices."""
    if name not in UNET_PRESETS:
        raise KeyError(f"unknown UNet preset {name!r}; choose from {sorted(UNET_PRESETS)}")
    return {**UNET_PRESETS[name], **overrides}
