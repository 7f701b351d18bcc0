"""KL-autoencoder state-dict conversion between our (= diffusers) names and the CompVis ``ldm`` layout.

CompVis ``AutoencoderKL`` checkpoints (``first_stage_model.*`` inside a Stable Diffusion checkpoint,
``vae.*`` in some, or bare in a stand-alone VAE file) name the modules

    {encoder,decoder}.norm_out              <-> {encoder,decoder}.conv_norm_out
    encoder.down.{i}.block.{j}              <-> encoder.down_blocks.{i}.resnets.{j}
    encoder.down.{i}.downsample.conv        <-> encoder.down_blocks.{i}.downsamplers.0.conv
    decoder.up.{L-1-k}.block.{j}            <-> decoder.up_blocks.{k}.resnets.{j}    (numbered bottom-up)
    decoder.up.{L-1-k}.upsample.conv        <-> decoder.up_blocks.{k}.upsamplers.0.conv
    {encoder,decoder}.mid.block_{1,2}       <-> {encoder,decoder}.mid_block.resnets.{0,1}
    {encoder,decoder}.mid.attn_1.{norm,q,k,v,proj_out}
                                            <-> ....mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}

with ``nin_shortcut`` for ``conv_shortcut``; conv_in, conv_out, quant_conv and post_quant_conv keep
their names. The mid-block attention projections are 1x1 convolutions there, (C, C, 1, 1), and
Linear layers here, (C, C). Pure functions: tensors are shared except for those reshapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

COMPVIS_PREFIXES = ("first_stage_model.", "vae.")
TRAINING_ONLY_PREFIXES = ("loss.",)  # the LPIPS/discriminator of CompVis' stage-1 training, not the model
_RESNET = (("conv_shortcut", "nin_shortcut"),)
_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))

StateDict = Mapping[str, torch.Tensor]


def module_pairs(levels: int) -> list[tuple[str, str]]:
    """(our module path, CompVis module path) for an autoencoder with `levels` resolution levels."""
    pairs = [("encoder.conv_norm_out", "encoder.norm_out"), ("decoder.conv_norm_out", "decoder.norm_out")]
    resnets = []
    for side in ("encoder", "decoder"):
        resnets += [(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1"),
                    (f"{side}.mid_block.resnets.1", f"{side}.mid.block_2")]
        ours, theirs = f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1"
        pairs += [(f"{ours}.{a}", f"{theirs}.{b}") for a, b in _ATTENTION]
    for i in range(levels):
        k = levels - 1 - i  # decoder up_blocks run top-down, CompVis' decoder.up bottom-up
        pairs += [(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"),
                  (f"decoder.up_blocks.{k}.upsamplers.0.conv", f"decoder.up.{i}.upsample.conv")]
        resnets += [(f"encoder.down_blocks.{i}.resnets", f"encoder.down.{i}.block"),
                    (f"decoder.up_blocks.{k}.resnets", f"decoder.up.{i}.block")]
    return pairs + resnets


def _rename(key: str, table: dict[str, str], names: tuple[tuple[str, str], ...]) -> str:
    """Rename the longest module prefix of key found in table, then single path components by names."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        new = table.get(".".join(parts[:cut]))
        if new is not None:
            parts = [*new.split("."), *parts[cut:]]
            break
    for old, new in names:
        parts = [new if p == old else p for p in parts]
    return ".".join(parts)


def _levels(keys: list[str], pattern: str) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    if not found:
        raise ValueError(f"not an autoencoder state dict: no keys match {pattern!r}")
    return max(found) + 1


def _is_attention_weight(key: str) -> bool:
    """A q/k/v/output projection weight of a mid-block attention (either naming)."""
    return bool(re.search(r"mid(_block\.attentions\.0|\.attn_1)\.(to_[qkv]|to_out\.0|[qkv]|proj_out)\.weight$", key))


def compvis_vae_subdict(state: StateDict) -> dict[str, torch.Tensor]:
    """The bare CompVis autoencoder dict: keys under first_stage_model./vae. if present, minus loss.* keys."""
    for prefix in COMPVIS_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}


def compvis_to_diffusers(state: StateDict) -> dict[str, torch.Tensor]:
    """Convert a CompVis autoencoder state dict (full SD checkpoint or bare) to our/diffusers names."""
    sub = compvis_vae_subdict(state)
    table = {b: a for a, b in module_pairs(_levels(list(sub), r"encoder\.down\.(\d+)\."))}
    out = {}
    for key, value in sub.items():
        new = _rename(key, table, tuple((b, a) for a, b in _RESNET))
        if _is_attention_weight(key) and value.ndim > 2 and all(s == 1 for s in value.shape[2:]):
            value = value.reshape(value.shape[0], value.shape[1])  # 1x1 conv (C, C, 1, 1) -> Linear (C, C)
        out[new] = value
    return out


def diffusers_to_compvis(state: StateDict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Convert our/diffusers autoencoder state dict to CompVis names; prefix e.g. ``first_stage_model.``."""
    table = dict(module_pairs(_levels(list(state), r"encoder\.down_blocks\.(\d+)\.")))
    out = {}
    for key, value in state.items():
        if _is_attention_weight(key) and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)  # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
        out[prefix + _rename(key, table, _RESNET)] = value
    return out
