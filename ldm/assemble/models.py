"""The network of the ``model`` section, the one place that knows which network a config describes (today the
UNet): its constructor arguments, its initial weights (``model.init_from``), LoRA adapters (``model.lora``), trained
states loaded back, and plain full weights (adapters merged) for exports.

A trained state is either plain full weights (an export's: a plain UNet, loaded strictly) or the trained module's
own state, which with LoRA holds peft's names (``...to_q.lora_A.default.weight``, ``...to_q.base_layer.weight``) and
may hold the adapters alone (the EMA's, a checkpoint's): those are loaded over ``model.init_from``'s weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ldm.config import UNET_EXTRA, ConfigError, UNetConfig
from ldm.io import read_state_dict
from ldm.models import UNet, load_unet_weights, unet_preset
from ldm.models.io import DIFFUSERS_WEIGHTS_NAME


def _declared(cfg: UNetConfig) -> dict:
    """The preset's UNet arguments, then every key the config sets explicitly."""
    explicit = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                if f.name not in UNET_EXTRA and getattr(cfg, f.name) is not None}
    base = unet_preset(cfg.preset) if cfg.preset else {}
    if "num_heads" in explicit:
        base.pop("head_dim", None)
    if "head_dim" in explicit:
        base.pop("num_heads", None)
    return {**base, **explicit}


def unet_kwargs(cfg: UNetConfig, in_channels: int, context_dim: int, pooled_dim: int | None = None) -> dict:
    """UNet constructor arguments: the preset, then every key the config sets explicitly; the text widths come from
    the text encoder (or its cache): context_dim always, pooled_dim when the UNet has SDXL's added conditioning."""
    kwargs = {**_declared(cfg), "in_channels": in_channels, "out_channels": in_channels, "context_dim": context_dim}
    if kwargs.get("addition_time_embed_dim") is None:
        kwargs.pop("pooled_dim", None)
        return kwargs
    if pooled_dim is None:
        raise ConfigError("model.addition_time_embed_dim: SDXL's added conditioning needs a pooled text vector, and "
                          "the text encoder gives none: set text_encoder.pooled (or an encoder's pooled) to true")
    if cfg.pooled_dim is not None and cfg.pooled_dim != pooled_dim:
        raise ConfigError(f"model.pooled_dim: {cfg.pooled_dim}, but the text encoder's pooled vector has {pooled_dim} "
                          "entries (leave it unset to take the encoder's)")
    return {**kwargs, "pooled_dim": pooled_dim}


def init_weights(path: str | Path) -> tuple[Path, str]:
    """(file, layout) of ``model.init_from``: a diffusers UNet folder, a diffusers pipeline folder (its unet/), an export
    of ours (its EMA weights), or a single weights file (diffusers or CompVis names, told apart by its keys)."""
    folder = Path(path)
    if folder.is_file():
        return folder, "auto"
    for candidate in (folder / "unet_ema.safetensors", folder / DIFFUSERS_WEIGHTS_NAME,
                      folder / "unet" / DIFFUSERS_WEIGHTS_NAME):
        if candidate.is_file():
            return candidate, "diffusers"
    raise ConfigError(f"model.init_from: {path} is neither a weights file nor a folder with UNet weights "
                      f"(unet_ema.safetensors, {DIFFUSERS_WEIGHTS_NAME} or unet/{DIFFUSERS_WEIGHTS_NAME})")


def load_init_weights(unet: torch.nn.Module, path: str | Path) -> None:
    """Load ``model.init_from`` into unet strictly; a mismatch is a ConfigError listing the differing tensors."""
    file, layout = init_weights(path)
    try:
        load_unet_weights(unet, file, layout=layout)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"model.init_from: {e}") from None


def unet_dims(state: dict[str, torch.Tensor], cfg: UNetConfig) -> tuple[int, int | None]:
    """(context_dim, pooled_dim) of UNet weights (diffusers or CompVis names): the middle block's cross-attention key
    projection reads the text width; SDXL's added-embedding MLP reads the pooled vector and the time ids."""
    context = next(v.shape[1] for k, v in state.items()
                   if k.endswith(("attn2.to_k.weight", "attn2.to_k.base_layer.weight")))
    added = next((v for k, v in state.items() if k.endswith(("add_embedding.linear_1.weight",
                                                               "add_embedding.linear_1.base_layer.weight",
                                                               "label_emb.0.0.weight"))), None)
    if added is None:
        return int(context), None
    kwargs = _declared(cfg)
    if kwargs.get("addition_time_embed_dim") is None:
        raise ValueError("the weights have SDXL's added conditioning (add_embedding), the config's UNet has not")
    return int(context), int(added.shape[1]) - kwargs.get("num_time_ids", 6) * kwargs["addition_time_embed_dim"]


def is_adapter_state(state: dict[str, torch.Tensor]) -> bool:
    """True for a LoRA-trained module's state (peft names), False for plain full weights."""
    return any(".lora_" in k for k in state)


def build_unet(cfg: UNetConfig, in_channels: int, context_dim: int, pooled_dim: int | None = None,
               state: dict[str, torch.Tensor] | None = None, source: str = "<state dict>") -> torch.nn.Module:
    """The UNet of ``cfg``. Without a state, or with the trained module's own: random weights, or init_from's, with
    model.lora's adapters added (only they then require gradients), the state's tensors loaded over them. With
    plain full weights: a plain UNet holding them (strictly)."""
    unet = UNet(**unet_kwargs(cfg, in_channels, context_dim, pooled_dim))
    if state is not None and not is_adapter_state(state):
        return load_unet_weights(unet, {k: v.float() for k, v in state.items()}, layout="diffusers")
    if cfg.init_from is not None:
        load_init_weights(unet, cfg.init_from)
    if cfg.lora is not None:
        from ldm.models.lora import add_lora

        lo = cfg.lora
        add_lora(unet, rank=lo.rank, alpha=lo.alpha, attention=lo.attention, convolutions=lo.convolutions,
                 extra=tuple(lo.extra), dropout=lo.dropout)
    if state is not None:
        own = unet.state_dict()
        trained = [n for n, p in unet.named_parameters() if p.requires_grad]
        missing = [n for n in trained if n not in state]
        unexpected = [k for k in state if k not in own]
        bad = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or bad:
            raise ValueError(f"{source}: not a state of this config's UNet (model.lora {cfg.lora}): missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}, mis-shaped {bad[:3]}")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)
    return unet


def plain_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full weights in the plain (diffusers) layout: LoRA adapters merged, W + (alpha / r) B A."""
    from peft.tuners.lora import LoraLayer

    if not any(isinstance(m, LoraLayer) for m in unet.modules()):
        return {k: v.detach().clone() for k, v in unet.state_dict().items()}
    from ldm.models.lora import merged_state_dict

    return {k: v.clone() for k, v in merged_state_dict(unet).items()}


def state_dims(cfg: UNetConfig, state: dict[str, torch.Tensor]) -> tuple[int, int | None]:
    """(context_dim, pooled_dim) of a trained state; an adapters-only state reads them from model.init_from's weights."""
    if is_adapter_state(state) and not any(".base_layer." in k for k in state):
        state = read_state_dict(init_weights(cfg.init_from)[0])
    return unet_dims(state, cfg)
