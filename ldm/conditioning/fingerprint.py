"""A text encoder's fingerprint: SHA-256 over its settings, tokenizer vocabulary and weights.

A cache of text embeddings is valid only for the encoder that made it; any change of weights (another
checkpoint), tokenizer (another vocabulary or merges) or setting (layer, final norm, length, masking, pooling,
the order of a composite's encoders) changes the fingerprint, so a stale cache is refused instead of
silently training on other embeddings.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

SETTINGS = ("max_length", "dim", "pooled_dim", "layer", "final_norm", "mask_padding", "pooled", "projection",
            "pooled_from")


def _settings(module: nn.Module) -> dict[str, Any]:
    return {"class": type(module).__name__, **{k: getattr(module, k) for k in SETTINGS if hasattr(module, k)}}


def _tokenizer_state(tokenizer: Any) -> Any:
    """What a tokenizer maps text with: its vocabulary (and BPE merges), special tokens and length settings."""
    if hasattr(tokenizer, "get_vocab"):  # transformers
        special = getattr(tokenizer, "all_special_tokens", [])
        return {"vocab": sorted(tokenizer.get_vocab().items()), "special": list(special),
                "lower": bool(getattr(tokenizer, "do_lower_case", False)), "class": type(tokenizer).__name__}
    inner = getattr(tokenizer, "tokenizer", tokenizer)  # open_clip's wrapper holds a SimpleTokenizer
    state = {"class": type(tokenizer).__name__, "context_length": getattr(tokenizer, "context_length", None)}
    if hasattr(inner, "encoder"):
        state["vocab"] = sorted(inner.encoder.items())
    if hasattr(inner, "bpe_ranks"):
        state["merges"] = sorted((" ".join(pair), rank) for pair, rank in inner.bpe_ranks.items())
    if len(state) == 2:
        raise ValueError(f"cannot fingerprint tokenizer {type(tokenizer).__name__}: no vocabulary found")
    return state


def text_encoder_fingerprint(encoder: nn.Module) -> str:
    """SHA-256 hex digest of an encoder's (or a composite's) settings, tokenizers and weights, in module order."""
    h = hashlib.sha256()
    for name, module in encoder.named_modules():
        if hasattr(module, "max_length"):  # every text encoder, composites and their parts
            h.update(json.dumps([name, _settings(module)], sort_keys=True, default=str).encode())
        if hasattr(module, "tokenizer") and not isinstance(module.tokenizer, nn.Module):
            h.update(json.dumps([name, _tokenizer_state(module.tokenizer)], default=str).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
