"""Exponential moving average of trained weights, kept per rank on that rank's own parameter partition.

Under ZeRO-3 a rank holds only its partition (``param.ds_tensor``); the EMA follows that partition, so no
rank ever gathers the full model to update it. Under ZeRO 0-2 every rank holds the full parameters. EDM2's power
EMAs (``power_ema.PowerEMA``, optional) are tracked on the same local tensors and updated with the EMA.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ldm.train.power_ema import PowerEMA


def _local(p: nn.Parameter) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class EMA:
    """theta_ema <- d theta_ema + (1 - d) theta, with the usual warm-up d_k = min(d, (1 + k) / (10 + k)); with
    ``power_sigma_rels`` also the power EMAs of those relative widths (``power``, None without)."""

    def __init__(self, module: nn.Module, decay: float = 0.999, power_sigma_rels: Sequence[float] | None = None):
        self.decay = decay
        self.named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.shadow = [_local(p).detach().float().clone() for _, p in self.named]
        self.partitioned = any(hasattr(p, "ds_tensor") for _, p in self.named)
        self.power = PowerEMA(self.local_tensors(), power_sigma_rels) if power_sigma_rels else None

    def local_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's live parameter tensors by name (its ZeRO-3 partitions, or the full parameters)."""
        return {n: _local(p) for n, p in self.named}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The full shape of every parameter (also under ZeRO-3, where a rank holds a flat partition)."""
        return {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in self.named}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step ``step`` (1, 2, ...)."""
        d = min(self.decay, (1 + step) / (10 + step))
        for s, (_, p) in zip(self.shadow, self.named):
            s.lerp_(_local(p).float(), 1 - d)
        if self.power is not None:
            self.power.update(self.local_tensors(), step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: s for s, (n, _) in zip(self.shadow, self.named)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n, _ in self.named if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for s, (n, _) in zip(self.shadow, self.named):
            if state[n].shape != s.shape:
                raise ValueError(f"EMA parameter {n}: shape {tuple(state[n].shape)} != {tuple(s.shape)}")
            s.copy_(state[n])

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load full EMA weights by name (e.g. from a checkpoint of another world size), keeping this rank's part."""
        self.load_state_dict(self.partition(state))

    def partition(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's parts of full weights by name, shaped like its local tensors.

        Under ZeRO-3 a parameter's partition on rank r of W is its flattened tensor, zero-padded to W equal
        parts, part r (the layout ``consolidate_partitions`` undoes).
        """
        import torch.distributed as dist

        rank = dist.get_rank() if self.partitioned else 0
        local, shapes = {}, self.shapes()
        for s, (n, _) in zip(self.shadow, self.named):
            if n not in state:
                raise KeyError(f"EMA state lacks parameter {n}")
            if tuple(state[n].shape) != shapes[n]:
                raise ValueError(f"EMA parameter {n}: shape {tuple(state[n].shape)} != {shapes[n]}")
            full = state[n].float().flatten()
            if self.partitioned:
                size = s.numel()
                full = torch.nn.functional.pad(full, (0, max(0, size * (rank + 1) - full.numel())))
                local[n] = full[rank * size:(rank + 1) * size].view_as(s)
            else:
                local[n] = full.view_as(s)
        return local

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full EMA weights by parameter name. Under ZeRO-3 this is collective: every rank must call it."""
        if not self.partitioned:
            return {n: s.clone() for n, s in self.state_dict().items()}
        import torch.distributed as dist

        out = {}
        for s, (n, p) in zip(self.shadow, self.named):
            parts = [torch.empty_like(s) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, s.contiguous())
            out[n] = consolidate_partitions(parts, p.ds_shape)
        return out


def consolidate_partitions(parts: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """Rebuild a ZeRO-3 parameter from its per-rank flat partitions (rank order, last one padded)."""
    numel = int(torch.Size(shape).numel())
    return torch.cat([t.flatten() for t in parts])[:numel].view(shape).clone()
