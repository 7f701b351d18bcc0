"""The network of the ``model`` section, the one place that knows which network a config describes (``model.kind``:
the cross-attention UNet, PixArt-alpha's DiT or SD3's MMDiT; every function below takes any of them, the names say
"unet" for the default): its constructor arguments, its initial weights (``model.init_from``), LoRA adapters
(``model.lora``), trained states loaded back, and plain full weights (adapters merged) for exports.

A trained state is either plain full weights (an export's: a plain UNet, loaded strictly) or the trained module's
own state, which with LoRA holds peft's names (``...to_q.lora_A.default.weight``, ``...to_q.base_layer.weight``) and
may hold the adapters alone (the EMA's, a checkpoint's): those are loaded over ``model.init_from``'s weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.config import MODEL_KEYS, ConfigError, UNetConfig
from ldm.io import read_state_dict
from ldm.models import NETWORKS, load_model_weights, load_unet_weights, model_preset
from ldm.models.io import DIFFUSERS_WEIGHTS_NAME

SUBFOLDER = {"unet": "unet", "dit": "transformer", "mmdit": "transformer"}  # its folder in a diffusers pipeline


def _declared(cfg: UNetConfig) -> dict:
    """The preset's arguments, then every key the config sets explicitly."""
    explicit = {k: getattr(cfg, k) for k in MODEL_KEYS[cfg.kind] if getattr(cfg, k) is not None}
    base = model_preset(cfg.kind, cfg.preset) if cfg.preset else {}
    if "num_heads" in explicit:
        base.pop("head_dim", None)
    if "head_dim" in explicit:
        base.pop("num_heads", None)
    return {**base, **explicit}


def unet_kwargs(cfg: UNetConfig, in_channels: int, context_dim: int, pooled_dim: int | None = None,
                latent_size: int | None = None) -> dict:
    """The network's constructor arguments: the preset, then every key the config sets explicitly; the latent
    channels (in and out) come from the autoencoder, the text widths from the text encoder (or its cache): context_dim
    always, pooled_dim when the network takes a pooled vector (SDXL's added conditioning, the MMDiT); a transformer's
    positions are laid out for the trained latent side ``latent_size``. The output has the latent's channels (the
    published PixArt presets' learned-variance half is not trained here)."""
    kwargs = {**_declared(cfg), "in_channels": in_channels, "out_channels": in_channels, "context_dim": context_dim}
    if cfg.kind != "unet":
        return _transformer_kwargs(cfg, kwargs, pooled_dim, latent_size)
    if kwargs.get("addition_time_embed_dim") is None:
        kwargs.pop("pooled_dim", None)
        return kwargs
    return {**kwargs, "pooled_dim": _pooled_dim(cfg, pooled_dim, "model.addition_time_embed_dim: SDXL's added "
                                                "conditioning needs a pooled text vector")}


def _pooled_dim(cfg: UNetConfig, pooled_dim: int | None, needs: str) -> int:
    """The pooled width of a network that embeds the pooled text vector: the text encoder's (model.pooled_dim, when
    set, must agree)."""
    if pooled_dim is None:
        raise ConfigError(f"{needs}, and the text encoder gives none: set text_encoder.pooled (or an encoder's "
                          "pooled) to true")
    if cfg.pooled_dim is not None and cfg.pooled_dim != pooled_dim:
        raise ConfigError(f"model.pooled_dim: {cfg.pooled_dim}, but the text encoder's pooled vector has {pooled_dim} "
                          "entries (leave it unset to take the encoder's)")
    return pooled_dim


def _transformer_kwargs(cfg: UNetConfig, kwargs: dict, pooled_dim: int | None, latent_size: int | None) -> dict:
    if latent_size is None:
        raise ValueError("a transformer's arguments need the latent side (latent_size)")
    check_patches(cfg, latent_size)
    patch = kwargs.get("patch_size", 2)
    kwargs["sample_size"] = latent_size
    if cfg.kind == "dit":
        return kwargs
    pooled_dim = _pooled_dim(cfg, pooled_dim, "model.kind: the MMDiT embeds a pooled text vector")
    most = kwargs.get("pos_embed_max_size")
    if most is not None and most * patch < latent_size:
        raise ConfigError(f"model.pos_embed_max_size: {most} patches of {patch} do not cover the latent side "
                          f"{latent_size}")
    return {**kwargs, "pooled_dim": pooled_dim}


def check_patches(cfg: UNetConfig, latent_size: int) -> None:
    """A transformer's patches must tile the latent (data.image_size over the autoencoder's factor)."""
    if cfg.kind == "unet":
        return
    patch = _declared(cfg).get("patch_size", 2)
    if latent_size % patch:
        raise ConfigError(f"model.patch_size: {patch} does not divide the latent side {latent_size} (data.image_size "
                          "over the autoencoder's downsampling factor)")


def micro_conditioned(cfg: UNetConfig, kwargs: dict) -> bool:
    """True when the network of these arguments embeds size/crop ids (``time_ids``): SDXL's UNet, PixArt's 1024-px
    DiT."""
    if cfg.kind == "unet":
        return kwargs.get("addition_time_embed_dim") is not None
    return bool(kwargs.get("size_conditioning", False))


def init_weights(path: str | Path, kind: str = "unet") -> tuple[Path, str]:
    """(file, layout) of ``model.init_from`` for a network of ``kind``: a diffusers model folder, a diffusers pipeline
    folder (its unet/ or transformer/), an export of ours (its EMA weights), or a single weights file (a UNet's in
    diffusers or CompVis names, told apart by its keys)."""
    folder = Path(path)
    if folder.is_file():
        return folder, "auto" if kind == "unet" else "diffusers"
    sub = SUBFOLDER[kind]
    for candidate in (folder / "unet_ema.safetensors", folder / DIFFUSERS_WEIGHTS_NAME,
                      folder / sub / DIFFUSERS_WEIGHTS_NAME):
        if candidate.is_file():
            return candidate, "diffusers"
    raise ConfigError(f"model.init_from: {path} is neither a weights file nor a folder with {kind} weights "
                      f"(unet_ema.safetensors, {DIFFUSERS_WEIGHTS_NAME} or {sub}/{DIFFUSERS_WEIGHTS_NAME})")


def load_init_weights(unet: torch.nn.Module, path: str | Path, kind: str = "unet") -> None:
    """Load ``model.init_from`` into the network strictly; a mismatch is a ConfigError listing the differing tensors."""
    file, layout = init_weights(path, kind)
    try:
        if kind == "unet":
            load_unet_weights(unet, file, layout=layout)
        else:
            load_model_weights(unet, file)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"model.init_from: {e}") from None


def _weight(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The tensor ``name`` of plain or LoRA-trained weights (peft keeps the base weight as ``...base_layer.weight``)."""
    stem = name.removesuffix(".weight")
    for key in (name, f"{stem}.base_layer.weight"):
        if key in state:
            return state[key]
    raise KeyError(f"the weights have no {name}")


def unet_dims(state: dict[str, torch.Tensor], cfg: UNetConfig) -> tuple[int, int | None]:
    """(context_dim, pooled_dim) of the network's weights (a UNet's in diffusers or CompVis names): the UNet's
    cross-attention key projection reads the text width, SDXL's added-embedding MLP the pooled vector and the time
    ids; the DiT's caption projection and the MMDiT's context embedder the text width, the MMDiT's text embedder the
    pooled one."""
    if cfg.kind == "dit":
        return int(_weight(state, "caption_projection.linear_1.weight").shape[1]), None
    if cfg.kind == "mmdit":
        return (int(_weight(state, "context_embedder.weight").shape[1]),
                int(_weight(state, "time_text_embed.text_embedder.linear_1.weight").shape[1]))
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
               state: dict[str, torch.Tensor] | None = None, source: str = "<state dict>",
               latent_size: int | None = None) -> torch.nn.Module:
    """The network of ``cfg`` (``model.kind``). Without a state, or with the trained module's own: random weights, or
    init_from's, with model.lora's adapters added (only they then require gradients), the state's tensors loaded over
    them. With plain full weights: a plain network holding them (strictly)."""
    unet = NETWORKS[cfg.kind](**unet_kwargs(cfg, in_channels, context_dim, pooled_dim, latent_size))
    if state is not None and not is_adapter_state(state):
        return load_model_weights(unet, {k: v.float() for k, v in state.items()})
    if cfg.init_from is not None:
        load_init_weights(unet, cfg.init_from, cfg.kind)
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
        state = read_state_dict(init_weights(cfg.init_from, cfg.kind)[0])
    return unet_dims(state, cfg)
