"""T5 encoder-only text encoding (Raffel et al. 2020) as PixArt-alpha and Stable Diffusion 3 use it: the last hidden
states of a transformers ``T5EncoderModel`` (T5-v1.1-XXL there, 4096-d) from a local folder.

The two models read it differently, and ``mask_padding`` chooses which: PixArt-alpha (``mask_padding=True``, 120
tokens) runs T5 under the tokenizer's attention mask and cross-attends under the same mask; SD3 (``False``, 256
tokens) runs T5 without a mask and attends to every position, padding included, as its pipelines do. ``path`` is a
T5 encoder folder (a full encoder-decoder T5 checkpoint loads its encoder) or a diffusers pipeline folder with the
encoder in ``subfolder`` and its tokenizer beside it (PixArt: text_encoder/ + tokenizer/; SD3: text_encoder_3/ +
tokenizer_3/). ``pooled=True`` adds the mean over the attended tokens (T5 has no pooled output of its own).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ldm.conditioning.base import Cond, FrozenTextEncoder, masked_mean

TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


class T5TextEncoder(FrozenTextEncoder):
    """A transformers T5 encoder + tokenizer from local folders, frozen."""

    def __init__(self, path: str, max_length: int = 120, mask_padding: bool = True, pooled: bool = False,
                 tokenizer_path: str | None = None, subfolder: str = "text_encoder"):
        super().__init__()
        from transformers import AutoTokenizer, T5EncoderModel

        model_dir = Path(path)
        if (model_dir / subfolder).is_dir():  # a diffusers pipeline folder
            tokenizer_dir = model_dir / subfolder.replace("text_encoder", "tokenizer")
            model_dir, tokenizer_path = model_dir / subfolder, tokenizer_path or str(tokenizer_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"T5 encoder folder not found: {model_dir}")
        if tokenizer_path is None and not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
            tokenizer_path = str(model_dir.parent / model_dir.name.replace("text_encoder", "tokenizer"))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or str(model_dir))
        self.model, info = T5EncoderModel.from_pretrained(str(model_dir), output_loading_info=True)
        bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
        if bad:
            raise ValueError(f"T5 encoder in {model_dir} does not match its config: {bad}")
        self.max_length, self.mask_padding, self.pooled = max_length, mask_padding, pooled
        self.dim = self.pooled_dim = int(self.model.config.d_model)
        self.freeze()

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Cond:
        """Encode prompts to (B, max_length, D) token features and their mask (all True unless mask_padding)."""
        batch = self.tokenize(prompts)
        ids, attention = batch["input_ids"], batch["attention_mask"]  # (B, L), (B, L)
        hidden = self.model(input_ids=ids, attention_mask=attention if self.mask_padding else None).last_hidden_state
        mask = attention.bool() if self.mask_padding else torch.ones_like(ids, dtype=torch.bool)
        cond = {"context": hidden.float(), "context_mask": mask}  # (B, L, D), (B, L)
        if self.pooled:
            cond["pooled"] = masked_mean(cond["context"], attention.bool())  # (B, D)
        return cond
