"""LoRA fine-tuning of the UNet, DiT or MMDiT (Hu et al. 2021) with peft: W x + (alpha / r) B A x on chosen layers,
A and B trained.

``add_lora`` injects peft adapters (named ``<module>.lora_A.default`` / ``.lora_B.default``, the base layer under
``<module>.base_layer``) into the attention projections and, optionally, the ResNet and resampling convolutions;
afterwards only adapter parameters require gradients. Three layers of ours compute diffusers' maps in a faster
form (the split GEGLU projection, SD 1.x's 1x1 projections applied to tokens, the fused upsampling convolution);
each gets a LoRA layer of the same parameters that computes as its base does.

Files: ``save_lora``/``load_lora`` write and read the adapter tensors exactly (for resume);
``export_diffusers_lora`` writes a file diffusers' ``load_lora_weights`` / ``load_lora_adapter`` read
(``unet.<module>.lora_{A,B}.weight``, the alpha / r scale folded into B so any loader applies it at scale 1);
``merged_state_dict`` / ``save_merged_diffusers`` give full weights W + (alpha / r) B A in the plain layout.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import Conv2d as LoraConv2d
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file

from ldm.io import check_state_dict
from ldm.models.attention import GatedProjection, TokenConv1x1
from ldm.models.blocks import UpsampleConv
from ldm.models.io import save_diffusers

ADAPTER = "default"
# self- and cross-attention of every transformer block (UNet, DiT); the MMDiT's text-stream projections too
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
CONVOLUTION_TARGETS = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")
METADATA_KEY = "ldm_lora"  # our settings in the adapter file (rank, alpha, targets)


class _ScaledDelta:
    """The sum over active adapters of scaling * B(A(dropout(x))), computed by ``_delta`` of each layer type."""

    def _lora_sum(self, x: torch.Tensor, delta) -> torch.Tensor | None:
        total = None
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            out = delta(a, b, self.lora_dropout[name](x.to(a.weight.dtype))) * self.scaling[name]
            total = out if total is None else total + out
        return total

    def _bypass(self) -> bool:
        """True when the base layer alone gives the output (adapters off, or merged into the weights)."""
        if self.disable_adapters and self.merged:
            self.unmerge()
        return self.disable_adapters or self.merged


class _PlainConvAdapters:
    """peft builds A and B as ``type(base_layer)(...)``; ours take other arguments, so A and B are plain convolutions
    (the shapes diffusers' layers get), built while the base layer briefly presents itself as an nn.Conv2d."""

    def update_layer(self, *args: Any, **kwargs: Any) -> None:
        base = self.get_base_layer()
        kind = type(base)
        base.__class__ = nn.Conv2d
        try:
            super().update_layer(*args, **kwargs)
        finally:
            base.__class__ = kind


class GatedLoraLinear(_ScaledDelta, LoraLinear):
    """LoRA on ``GatedProjection``: the update of the full (2 d) output, split into value and gate like the base."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        value, gate = self.base_layer(x)  # 2 x (..., d)
        if self._bypass():
            return value, gate
        delta = self._lora_sum(x, lambda a, b, h: b(a(h)))  # (..., 2 d)
        if delta is None:
            return value, gate
        d = value.shape[-1]
        return value + delta[..., :d].to(value.dtype), gate + delta[..., d:].to(gate.dtype)


class TokenLoraConv1x1(_ScaledDelta, _PlainConvAdapters, LoraConv2d):
    """LoRA on ``TokenConv1x1``: A and B are 1x1 convolutions (diffusers' shapes) applied to tokens as matmuls."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x)  # (B, N, out)
        if self._bypass():
            return out
        delta = self._lora_sum(x, lambda a, b, h: F.linear(F.linear(h, a.weight.flatten(1)), b.weight.flatten(1)))
        return out if delta is None else out + delta.to(out.dtype)  # (B, N, out)


class UpsampleLoraConv(_ScaledDelta, _PlainConvAdapters, LoraConv2d):
    """LoRA on ``UpsampleConv``: the adapter convolves the nearest-upsampled input, as diffusers' Upsample2D does."""

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        out = self.base_layer(x, size)  # (B, C, *size)
        if self._bypass():
            return out
        up = F.interpolate(x, size=size, mode="nearest")  # (B, C, *size)
        delta = self._lora_sum(up, lambda a, b, h: b(a(h)))
        return out if delta is None else out + delta.to(out.dtype)


_CUSTOM_LAYERS = {GatedProjection: GatedLoraLinear, TokenConv1x1: TokenLoraConv1x1, UpsampleConv: UpsampleLoraConv}


def lora_targets(attention: bool = True, convolutions: bool = False, extra: Sequence[str] = ()) -> list[str]:
    """Module-name suffixes to adapt: attention projections, ResNet/resampling convolutions, any extra ones
    (e.g. ``proj_in``, ``proj_out``, ``ff.net.0.proj``, ``ff.net.2``, ``time_emb_proj``)."""
    targets = [*(ATTENTION_TARGETS if attention else ()), *(CONVOLUTION_TARGETS if convolutions else ()), *extra]
    if not targets:
        raise ValueError("LoRA needs at least one target (attention, convolutions or extra)")
    return targets


def add_lora(unet: torch.nn.Module, rank: int = 4, alpha: float | None = None, attention: bool = True,
             convolutions: bool = False, extra: Sequence[str] = (), dropout: float = 0.0) -> torch.nn.Module:
    """Inject LoRA adapters of rank r (scale alpha / r; alpha defaults to r) into unet in place; freeze the rest.

    Returns unet, whose trainable parameters are then exactly the adapters' (give only those to the optimizer).
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if any(isinstance(m, LoraLayer) for m in unet.modules()):
        raise ValueError("this UNet already has LoRA adapters")
    targets = lora_targets(attention, convolutions, extra)
    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=targets,
                        lora_dropout=dropout, init_lora_weights=True)
    config._register_custom_module(_CUSTOM_LAYERS)
    inject_adapter_in_model(config, unet, adapter_name=ADAPTER)
    for name, p in unet.named_parameters():
        p.requires_grad_(".lora_" in name)
    unet.lora_settings = dict(rank=rank, alpha=float(config.lora_alpha), targets=targets, dropout=dropout)
    return unet


def lora_layers(unet: torch.nn.Module) -> dict[str, LoraLayer]:
    """Module path -> LoRA layer, for every adapted module of unet."""
    layers = {name: m for name, m in unet.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}
    if not layers:
        raise ValueError("this UNet has no LoRA adapters (call add_lora first)")
    return layers


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors, ``<module>.lora_A.weight`` / ``.lora_B.weight`` (peft's names without the adapter)."""
    lora_layers(unet)
    return get_peft_model_state_dict(unet, adapter_name=ADAPTER)


def load_lora_state_dict(unet: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str = "<state dict>") -> None:
    """Copy adapter tensors into unet's adapters; every key and shape must match (one error lists all)."""
    check_state_dict(lora_state_dict(unet), state, source)
    result = set_peft_model_state_dict(unet, dict(state), adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{source}: adapter tensors not used: {sorted(unexpected)[:5]}")


def _write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write a safetensors file through a temp file and a rename (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def save_lora(unet: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapter tensors (exact, in their dtype) and the LoRA settings to a safetensors file."""
    settings = getattr(unet, "lora_settings", {})
    return _write_safetensors(lora_state_dict(unet), path, {"format": "pt", METADATA_KEY: json.dumps(settings)})


def read_lora_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The LoRA settings (rank, alpha, targets, dropout) stored by ``save_lora``; {} for other files."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))


def load_lora(unet: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Load a ``save_lora`` file into unet, adding the adapters (with the file's settings) when it has none."""
    if not any(isinstance(m, LoraLayer) for m in unet.modules()):
        settings = read_lora_settings(path)
        if not settings:
            raise ValueError(f"{path}: no LoRA settings in the file; call add_lora with them first")
        add_lora(unet, rank=settings["rank"], alpha=settings["alpha"], attention=False, convolutions=False,
                 extra=settings["targets"], dropout=settings.get("dropout", 0.0))
    with safe_open(str(path), framework="pt", device="cpu") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    load_lora_state_dict(unet, state, str(path))
    return unet


def export_diffusers_lora(unet: torch.nn.Module, path: str | os.PathLike, prefix: str = "unet") -> Path:
    """Write a LoRA file in diffusers' (peft) naming, ``unet.<module>.lora_{A,B}.weight``, the scale in B.

    diffusers (``pipe.load_lora_weights(path)``, ``UNet2DConditionModel.load_lora_adapter(path, prefix="unet")``)
    infers rank and targets from the tensors and applies them at scale 1, which is exact: B is stored times
    alpha / r. Tensors are written in float32.
    """
    state = {}
    for name, layer in lora_layers(unet).items():
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        state[f"{prefix}.{name}.lora_A.weight"] = a.float()
        state[f"{prefix}.{name}.lora_B.weight"] = b.float() * float(layer.scaling[ADAPTER])
    return _write_safetensors(state, path, {"format": "pt"})


def merged_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full weights in the plain (diffusers) layout: each adapted weight W + (alpha / r) B A, nothing else changed."""
    layers = lora_layers(unet)
    state = {k.replace(".base_layer.", "."): v.detach() for k, v in unet.state_dict().items() if ".lora_" not in k}
    for name, layer in layers.items():
        key = f"{name}.weight"
        delta = layer.get_delta_weight(ADAPTER)  # (out, in[, k, k])
        state[key] = (state[key].float() + delta.float()).to(state[key].dtype)
    return state


def save_merged_diffusers(unet: torch.nn.Module, folder: str | os.PathLike) -> Path:
    """Write the merged full weights as a diffusers UNet2DConditionModel folder (``save_diffusers`` layout)."""
    return save_diffusers(unet, folder, state_dict=merged_state_dict(unet))
