"""The text-conditioning interface: a frozen encoder maps prompts to a Cond; the null condition.

Latent diffusion conditions the UNet's cross-attention on the token embeddings of a frozen language model
(Rombach et al. 2022, Sec. 3.3). Every encoder is an ``nn.Module`` mapping a list of prompts to
``{"context": (B, L, D) float, "context_mask": (B, L) bool}`` (True = a token the UNet attends to), plus
``"pooled": (B, P)`` when built with ``pooled=True``; it is frozen (eval mode, no gradients) and exposes
``dim`` (D), ``max_length`` (L) and ``pooled_dim`` (P).

The empty prompt's embedding is the null condition for classifier-free guidance; it is computed once and
stored with the model so training and sampling use the identical tensor.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)
Tensor = torch.Tensor
Cond = dict[str, Tensor]  # {"context": (B, L, D), "context_mask": (B, L) bool[, "pooled": (B, P)]}
LAYERS = ("last", "penultimate")
NULL_KINDS = ("empty", "zeros")


def check_layer(layer: str) -> None:
    """ValueError unless layer is one of LAYERS."""
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")


class FrozenTextEncoder(nn.Module):
    """Base of the text encoders: always in eval mode, parameters frozen, outputs a Cond."""

    dim: int
    max_length: int
    pooled_dim: int

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
        """Token ids and attention mask, padded/truncated to max_length, on the encoder's device; prompts that had
        to be cut are counted (``prompts_cut``) and the first cut is reported once (a log warning naming the prompt):
        a training run sees the same long captions every epoch and would repeat the warning every step."""
        lengths = [len(ids) for ids in self.tokenizer(list(prompts), truncation=False)["input_ids"]]
        cut = [p for p, n in zip(prompts, lengths) if n > self.max_length]
        if cut:
            if not getattr(self, "prompts_cut", 0):
                log.warning("%d prompt(s) longer than text_encoder.max_length=%d tokens were cut to that length, e.g. "
                            "%r (%d tokens); raise text_encoder.max_length to keep them (further cuts are counted, "
                            "not reported)", len(cut), self.max_length,
                            cut[0][:80] + ("..." if len(cut[0]) > 80 else ""), max(lengths))
            self.prompts_cut = getattr(self, "prompts_cut", 0) + len(cut)
        return self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                              return_tensors="pt").to(self.device)


def masked_mean(context: Tensor, mask: Tensor) -> Tensor:
    """Mean of context (B, L, D) over the tokens where mask (B, L) is True -> (B, D)."""
    weights = mask.to(context.dtype)[..., None]  # (B, L, 1)
    return (context * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, D)


def null_condition(encoder: nn.Module, kind: str = "empty") -> Cond:
    """The null condition for guidance (1, L, D), its mask and pooled vector (when the encoder gives one).

    kind "empty" encodes the empty prompt (SD 1.x/2.x); "zeros" is all-zero features and pooled vector with
    every position attended, what SDXL's pipelines use for an empty negative prompt (force_zeros_for_empty_prompt).
    """
    if kind not in NULL_KINDS:
        raise ValueError(f"null condition kind must be one of {NULL_KINDS}, got {kind!r}")
    cond = encoder([""])
    if kind == "zeros":
        cond = {k: torch.ones_like(v) if k == "context_mask" else torch.zeros_like(v) for k, v in cond.items()}
    return cond


def expand_cond(cond: Cond, batch: int) -> Cond:
    """Repeat a (1, ...) condition to a batch."""
    return {k: v.expand(batch, *v.shape[1:]) for k, v in cond.items()}
