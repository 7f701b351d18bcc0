"""Size presets, one dict per network: name -> keyword arguments of ``UNet``, ``DiT`` (PixArt-alpha) or ``MMDiT`` (SD3).

The emoji-cpu presets are sized for 32 px emoji (8x8x8 latents, 16 MiniLM tokens of 384-d) so that a training step
of each backbone takes about as long as the UNet's on a 2-core CPU (``bench/bench_transformers.py``); the published
shapes are checked against diffusers' models, parameter for parameter (tests/models)."""

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


DIT_PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: two blocks, 32 wide.
    "tiny": dict(hidden_size=32, num_heads=4, num_layers=2, patch_size=2, context_dim=32, sample_size=8),
    # The CPU default beside the UNet's: 8 blocks of 256 = 4 x 64, 2x2 patches (8x8 latents are 16 tokens). 9.1M
    # parameters, 26 GFLOP per forward+backward at batch 32 with 16 tokens (the UNet's: 19), a step about as long.
    "emoji-cpu": dict(hidden_size=256, num_heads=4, num_layers=8, patch_size=2, context_dim=384, sample_size=8),
    # PixArt-alpha XL/2 (Chen et al. 2023; 610.9M parameters): 28 blocks of 1152 = 16 x 72, T5-XXL tokens (4096-d),
    # SD's 4-channel VAE latents, a learned variance (8 output channels). 512 px: 64x64 latents.
    "pixart-xl-2-512": dict(in_channels=4, out_channels=8, hidden_size=1152, num_heads=16, num_layers=28,
                            patch_size=2, context_dim=4096, sample_size=64, interpolation_scale=1.0),
    # PixArt-alpha XL/2 at 1024 px (611.3M): positions stretched by 2, the image size and aspect ratio embedded.
    "pixart-xl-2-1024": dict(in_channels=4, out_channels=8, hidden_size=1152, num_heads=16, num_layers=28,
                             patch_size=2, context_dim=4096, sample_size=128, interpolation_scale=2.0,
                             size_conditioning=True),
}

MMDIT_PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: two blocks (the second is the context-pre-only last block), 32 wide.
    "tiny": dict(hidden_size=32, num_heads=2, num_layers=2, patch_size=2, context_dim=32, pooled_dim=32,
                 sample_size=8, pos_embed_max_size=12),
    # The CPU default beside the UNet's: SD3's family at depth 4 (4 joint blocks of 4 x 64 = 256 for both streams),
    # 16 image + 16 text tokens, the MiniLM's mean-pooled vector as the pooled text, positions for up to 12x12
    # patches (SD3's 3x margin). 9.2M parameters, 18 GFLOP per forward+backward at batch 32, a step about as long.
    "emoji-cpu": dict(hidden_size=256, num_heads=4, num_layers=4, patch_size=2, context_dim=384, pooled_dim=384,
                      sample_size=8, pos_embed_max_size=12),
    # Stable Diffusion 3 medium (Esser et al. 2024; 2.03B parameters): depth 24, 24 x 64 heads, 16-channel latents,
    # CLIP-L + CLIP-G + T5-XXL tokens (4096-d), the two CLIP pooled vectors (2048-d), positions up to 192 x 192.
    "sd3-medium": dict(in_channels=16, out_channels=16, hidden_size=1536, num_heads=24, num_layers=24,
                       patch_size=2, context_dim=4096, pooled_dim=2048, sample_size=128, pos_embed_max_size=192),
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {"unet": UNET_PRESETS, "dit": DIT_PRESETS, "mmdit": MMDIT_PRESETS}


def model_preset(kind: str, name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of a preset's kwargs for a network kind ('unet', 'dit' or 'mmdit') with overrides applied; unknown
    kinds and names list the choices."""
    if kind not in PRESETS:
        raise KeyError(f"unknown model kind {kind!r}; choose from {sorted(PRESETS)}")
    if name not in PRESETS[kind]:
        raise KeyError(f"unknown {kind} preset {name!r}; choose from {sorted(PRESETS[kind])}")
    return {**PRESETS[kind][name], **overrides}


def unet_preset(name: str, **overrides: Any) -> dict[str, Any]:
    """Return a copy of a UNet preset's kwargs with overrides applied; unknown names list the choices."""
    if name not in UNET_PRESETS:
        raise KeyError(f"unknown UNet preset {name!r}; choose from {sorted(UNET_PRESETS)}")
    return {**UNET_PRESETS[name], **overrides}
