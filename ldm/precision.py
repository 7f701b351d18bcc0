"""Numeric precision of the fast CUDA path outside DeepSpeed's: the frozen parts under autocast, and TF32.

The frozen autoencoder and text encoder do no training, so their matmuls and convolutions can run in bf16 under
``torch.autocast`` (which keeps normalisations, softmax and reductions in fp32) while the trainer, the objective and
the samplers keep getting float32 tensors. ``train.frozen_dtype`` picks it: auto is bf16 on CUDA and fp32 (no
autocast) elsewhere, where bf16 convolutions are slower than fp32 ones.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

FROZEN_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def frozen_dtype(setting: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of the frozen parts for a ``train.frozen_dtype`` setting on ``device`` (None: fp32)."""
    if setting == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else None
    if setting not in FROZEN_DTYPES:
        raise ValueError(f"frozen dtype must be auto, {' or '.join(FROZEN_DTYPES)}, got {setting!r}")
    return FROZEN_DTYPES[setting]


def to_float32(out: Any) -> Any:
    """Floating tensors of an output (a tensor, or a dict / tuple / list of them) as float32; the rest unchanged."""
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, dict):
        return {k: to_float32(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(to_float32(v) for v in out)
    return out


class Autocast:
    """A frozen module's method run under ``torch.autocast(dtype)`` on the module's device, outputs as float32."""

    def __init__(self, module: nn.Module, method: Callable, dtype: torch.dtype):
        self.module, self.method, self.dtype = module, method, dtype

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        device = next(self.module.parameters()).device
        with torch.no_grad(), torch.autocast(device.type, dtype=self.dtype):
            out = self.method(*args, **kwargs)
        return to_float32(out)


def autocast_frozen(module: nn.Module, dtype: torch.dtype | None, methods: Sequence[str] = ("forward",)) -> nn.Module:
    """Run ``methods`` of a frozen ``module`` under autocast to ``dtype`` from now on (nothing for None); the module
    itself (weights in fp32, its state dict, its other attributes) is unchanged. Returns the module."""
    if dtype is not None:
        for name in methods:
            setattr(module, name, Autocast(module, getattr(module, name), dtype))
    module.autocast_dtype = dtype
    return module


def use_tf32(enabled: bool = True) -> None:
    """TF32 tensor cores for float32 matmuls and cuDNN convolutions (Ampere and later: 10-bit mantissa products,
    fp32 accumulation). Set through the long-standing ``allow_tf32`` switches: a value written there reads back
    through both the old switches and the newer ``fp32_precision`` ones, whereas writing ``fp32_precision`` makes
    later reads of ``allow_tf32`` (by DeepSpeed, tests, user code) raise."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
