"""The device a run or a command works on: ``auto`` is the first CUDA device when there is one, else the CPU."""

from __future__ import annotations

import torch

DEVICES = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str) -> torch.device:
    """The torch.device of ``run.device`` / ``--device`` (auto | cpu | cuda | cuda:N); ValueError naming the problem
    for another name, or for CUDA where there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r} (use {DEVICES})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} requested but no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r} (use {DEVICES})")
    return device
