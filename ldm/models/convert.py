"""UNet state-dict conversion between our (= diffusers) names and the CompVis/Stability ``ldm`` layout.

The CompVis ``openaimodel.UNetModel`` (Stable Diffusion 1.x/2.x checkpoints, prefix
``model.diffusion_model.``) flattens the encoder into ``input_blocks.{i}`` and the decoder into
``output_blocks.{i}``; each is a sequence ``[ResBlock, SpatialTransformer?, Down/Upsample?]``:

    time_embed.{0,2}               <-> time_embedding.linear_{1,2}
    label_emb.0.{0,2}              <-> add_embedding.linear_{1,2}           (SDXL: pooled text + size/crop)
    input_blocks.0.0               <-> conv_in
    input_blocks.{1+l(n+1)+j}.0    <-> down_blocks.{l}.resnets.{j}          (n = layers per block)
    input_blocks.{1+l(n+1)+j}.1    <-> down_blocks.{l}.attentions.{j}
    input_blocks.{1+l(n+1)+n}.0.op <-> down_blocks.{l}.downsamplers.0.conv
    middle_block.{0,1,2}           <-> mid_block.{resnets.0, attentions.0, resnets.1}
    output_blocks.{k(n+1)+j}.0     <-> up_blocks.{k}.resnets.{j}            (j <= n: n + 1 resnets per up block)
    output_blocks.{k(n+1)+j}.1     <-> up_blocks.{k}.attentions.{j}
    output_blocks.{k(n+1)+n}.{1|2}.conv <-> up_blocks.{k}.upsamplers.0.conv (2 when the block has attention)
    out.{0,2}                      <-> conv_norm_out, conv_out

Inside a ResBlock ``in_layers.{0,2}, emb_layers.1, out_layers.{0,3}, skip_connection`` are
``norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut``; spatial transformers use the same
names in both layouts, and every tensor keeps its shape. The functions are pure (state dict in,
state dict out, tensors shared, not copied); keys they do not recognise pass through unchanged so a
loader can report them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

COMPVIS_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_TOP = (("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
        ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2"),
        ("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2"))  # SDXL

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class UNetLayout:
    """What the key mapping depends on: levels, resnets per encoder level, which levels attend."""

    layers: int  # resnets per encoder level (the decoder has layers + 1)
    down_attention: tuple[bool, ...]  # per encoder level
    up_attention: tuple[bool, ...]  # per decoder level (deepest first)

    @property
    def levels(self) -> int:
        return len(self.down_attention)

    @classmethod
    def from_diffusers(cls, keys: list[str]) -> "UNetLayout":
        """Infer the layout from diffusers-style keys (down_blocks.*, up_blocks.*)."""
        levels = _count(keys, r"down_blocks\.(\d+)\.")
        layers = _count(keys, r"down_blocks\.0\.resnets\.(\d+)\.")
        if levels == 0 or layers == 0:
            raise ValueError("not a diffusers UNet state dict: no down_blocks.{l}.resnets.{j} keys")
        down = tuple(any(k.startswith(f"down_blocks.{lv}.attentions.") for k in keys) for lv in range(levels))
        up = tuple(any(k.startswith(f"up_blocks.{lv}.attentions.") for k in keys) for lv in range(levels))
        return cls(layers, down, up)

    @classmethod
    def from_compvis(cls, keys: list[str]) -> "UNetLayout":
        """Infer the layout from CompVis keys: downsamplers (``.0.op``) split input_blocks into levels."""
        blocks = _count(keys, r"input_blocks\.(\d+)\.")
        downsamplers = {int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))}
        levels = len(downsamplers) + 1
        if blocks < 2 or blocks % levels:
            raise ValueError(f"cannot infer the UNet layout from {blocks} input_blocks and {levels - 1} downsamplers")
        layers = blocks // levels - 1

        def attends(prefix: str) -> bool:
            return any(k.startswith(prefix) and ".transformer_blocks." in k for k in keys)

        down = tuple(attends(f"input_blocks.{1 + lv * (layers + 1)}.1.") for lv in range(levels))
        up = tuple(attends(f"output_blocks.{lv * (layers + 1)}.1.") for lv in range(levels))
        return cls(layers, down, up)

    def module_pairs(self) -> list[tuple[str, str]]:
        """(our module path, CompVis module path) for every renamed module, resnet internals included."""
        n = self.layers
        pairs = list(_TOP)
        resnets: list[tuple[str, str]] = [("mid_block.resnets.0", "middle_block.0"),
                                          ("mid_block.resnets.1", "middle_block.2")]
        pairs.append(("mid_block.attentions.0", "middle_block.1"))
        for lv in range(self.levels):
            for j in range(n):
                i = 1 + lv * (n + 1) + j
                resnets.append((f"down_blocks.{lv}.resnets.{j}", f"input_blocks.{i}.0"))
                if self.down_attention[lv]:
                    pairs.append((f"down_blocks.{lv}.attentions.{j}", f"input_blocks.{i}.1"))
            if lv < self.levels - 1:
                pairs.append((f"down_blocks.{lv}.downsamplers.0.conv", f"input_blocks.{1 + lv * (n + 1) + n}.0.op"))
        for lv in range(self.levels):
            attention = self.up_attention[lv]
            for j in range(n + 1):
                i = lv * (n + 1) + j
                resnets.append((f"up_blocks.{lv}.resnets.{j}", f"output_blocks.{i}.0"))
                if attention:
                    pairs.append((f"up_blocks.{lv}.attentions.{j}", f"output_blocks.{i}.1"))
            if lv < self.levels - 1:
                last = f"output_blocks.{lv * (n + 1) + n}.{2 if attention else 1}"  # after the attention, if any
                pairs.append((f"up_blocks.{lv}.upsamplers.0.conv", f"{last}.conv"))
        for ours, theirs in resnets:
            pairs.extend((f"{ours}.{a}", f"{theirs}.{b}") for a, b in _RESNET)
        return pairs


def _count(keys: list[str], pattern: str) -> int:
    """1 + the largest index captured by pattern at the start of a key (0 if none)."""
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def rename_modules(state: StateDict, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Rename each key's longest matching module prefix by pairs (old, new); other keys are kept."""
    table = dict(pairs)
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # the longest module path first
            new = table.get(".".join(parts[:cut]))
            if new is not None:
                key = ".".join([new, *parts[cut:]])
                break
        out[key] = value
    return out


def compvis_unet_subdict(state: StateDict, ema: bool = False) -> dict[str, torch.Tensor]:
    """The bare CompVis UNet dict of a full SD checkpoint (``model.diffusion_model.*``), or state itself.

    With ema=True the weights come from the checkpoint's ``model_ema.*`` copy, whose names are the
    UNet names without dots (``model_ema.diffusion_modelinput_blocks00weight``).
    """
    if not any(k.startswith(COMPVIS_PREFIX) for k in state):
        if ema:
            raise ValueError(f"ema=True needs a full checkpoint with {COMPVIS_PREFIX}* and {EMA_PREFIX}* keys")
        return dict(state)
    sub = {k[len(COMPVIS_PREFIX):]: v for k, v in state.items() if k.startswith(COMPVIS_PREFIX)}
    if not ema:
        return sub
    flat = {k: EMA_PREFIX + ("diffusion_model." + k).replace(".", "") for k in sub}
    missing = sorted(v for v in flat.values() if v not in state)
    if missing:
        raise ValueError(f"checkpoint has no EMA copy of {len(missing)} UNet tensors, e.g. {missing[:3]}")
    return {k: state[flat[k]] for k in sub}


def compvis_to_diffusers(state: StateDict, ema: bool = False) -> dict[str, torch.Tensor]:
    """Convert a CompVis UNet state dict (full SD checkpoint or bare) to our/diffusers names."""
    sub = compvis_unet_subdict(state, ema)
    pairs = UNetLayout.from_compvis(list(sub)).module_pairs()
    return rename_modules(sub, [(theirs, ours) for ours, theirs in pairs])


def diffusers_to_compvis(state: StateDict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Convert our/diffusers UNet state dict to CompVis names; prefix e.g. ``model.diffusion_model.``."""
    pairs = UNetLayout.from_diffusers(list(state)).module_pairs()
    return {prefix + k: v for k, v in rename_modules(state, pairs).items()}


def detect_layout(state: StateDict) -> str:
    """'compvis' or 'diffusers' from the key names; ValueError when neither fits."""
    keys = list(state)
    if any(k.startswith((COMPVIS_PREFIX, "input_blocks.", "time_embed.")) for k in keys):
        return "compvis"
    if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys):
        return "diffusers"
    raise ValueError(f"cannot tell the UNet checkpoint layout from its keys, e.g. {sorted(keys)[:5]}")
