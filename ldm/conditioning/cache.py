"""A memo in front of a frozen text encoder: each caption is encoded once per process.

The encoder is frozen, and captions are always encoded in batches of the same size (``CHUNK``, padded with empty
prompts; the tokenizers pad every prompt to max_length): a matmul's rounding depends on its shape, so encoding in
whatever batch a caption first appears in would make a resumed run (whose memo fills in other batches) differ from
the uninterrupted one in the last bits. One shape gives a caption the same embedding whatever its neighbours. The
trainer sees the same captions every epoch, so after the first epoch no caption is encoded again. Given a builder
instead of an encoder, the encoder is built on the first call only (a run training from cached embeddings never loads
it unless a sample grid or an evaluation needs prompts encoded).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ldm.conditioning.base import Cond

Tensor = torch.Tensor
CHUNK = 32  # prompts per encoder call


class CachedTextEncoder(nn.Module):
    """Wraps a text encoder (prompts -> Cond) with a per-caption memo of at most ``capacity`` captions."""

    def __init__(self, encoder: nn.Module | Callable[[], nn.Module], capacity: int = 200_000):
        super().__init__()
        if isinstance(encoder, nn.Module):
            self._encoder, self._build = encoder, None
        else:
            self._encoder, self._build = None, encoder
        self.capacity = capacity
        self._memo: dict[str, dict[str, Tensor]] = {}

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    @property
    def encoder(self) -> nn.Module:
        """The wrapped encoder (built now when it was given as a builder)."""
        if self._encoder is None:
            self._encoder = self._build()
        return self._encoder

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    @property
    def pooled_dim(self) -> int:
        return self.encoder.pooled_dim

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Cond:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._memo]
        if missing:
            if len(self._memo) + len(missing) > self.capacity:
                self._memo.clear()
            for start in range(0, len(missing), CHUNK):  # always CHUNK prompts: one shape, so one rounding
                chunk = missing[start:start + CHUNK]
                out = self.encoder(chunk + [""] * (CHUNK - len(chunk)))
                for i, prompt in enumerate(chunk):
                    self._memo[prompt] = {k: v[i] for k, v in out.items()}
        keys = self._memo[prompts[0]].keys()
        return {k: torch.stack([self._memo[p][k] for p in prompts]) for k in keys}  # (B, L, D), (B, L), ...
