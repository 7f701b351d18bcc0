"""Randomness that does not depend on how samples are batched: per-sample generators and draws from them.

Every stochastic function of the project takes a ``torch.Generator`` or a list with one generator per batch
element. The trainer seeds one generator per sample from (run seed, rollbacks, optimizer step, sample key), so a
sample's noise, time and condition dropout are the same whichever rank or micro-batch it lands in; sampling seeds
image i with its own seed. It lives with the math, which needs it, and imports nothing else of the project; data,
conditioning and training draw from it too.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import torch

Tensor = torch.Tensor
Generators = torch.Generator | Sequence[torch.Generator] | None


def per_sample(draw: Callable[[int, torch.Generator | None], Tensor], n: int, generator: Generators) -> Tensor:
    """``draw(k, g)`` -> (k, ...) from one generator, or one row per element from a list of per-sample generators."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(f"{len(generator)} generators for a batch of {n}")
        return torch.cat([draw(1, g) for g in generator])
    return draw(n, generator)


def randn(shape: tuple[int, ...], generator: Generators = None, device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise from one generator, or one generator per batch element (per-image seeds)."""
    def draw(k: int, g: torch.Generator | None) -> Tensor:
        return torch.randn((k, *shape[1:]), generator=g, device=g.device if g is not None else device, dtype=dtype)

    return to_device(per_sample(draw, shape[0], generator), device)  # one copy for the batch


def to_device(x: Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> Tensor:
    """``x.to(device, dtype)`` without making the host wait for the GPU: a CPU tensor bound for CUDA is copied through
    page-locked memory with a non-blocking copy (a plain copy from pageable memory waits for every kernel queued
    before it). The values are the same; the pinned buffer stays reserved until the copy has run. (An ``x`` already
    pinned is the buffer itself: do not change it in place afterwards.)"""
    x = x if dtype is None else x.to(dtype)
    if x.device.type == "cpu" and torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def rand(n: int, generator: Generators = None) -> Tensor:
    """(n,) float64 uniforms on [0, 1) on the CPU, from one generator or one per element."""
    return per_sample(lambda k, g: torch.rand(k, generator=g, dtype=torch.float64,
                                              device=g.device if g is not None else "cpu").cpu(), n, generator)


def keyed_seed(*parts: object) -> int:
    """A 64-bit seed from a key made of the parts (stable across processes, platforms and Python versions)."""
    key = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def sample_generators(keys: Sequence[str], *prefix: object) -> list[torch.Generator]:
    """One CPU generator per sample key, seeded by keyed_seed(*prefix, key)."""
    return [torch.Generator().manual_seed(keyed_seed(*prefix, key)) for key in keys]
