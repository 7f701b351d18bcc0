"""The timing primitives of bench/bench_gpu.py: the bf16 matmul peak, the UNet train step (forward + MSE + backward +
fused AdamW under bf16 autocast on CUDA, fp32 weights), its FLOPs (torch's FlopCounterMode), and the batch that fills
the GPU. Device-agnostic: the CPU dry run runs the same code at tiny shapes."""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def memory(device: str) -> dict[str, float]:
    if device != "cuda":
        return {}
    return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def peak_setting(cuda: bool) -> tuple[torch.dtype, int]:
    return (torch.bfloat16, 8192) if cuda else (torch.float32, 512)


def matmul_peak(device: str, dtype: torch.dtype, n: int, repeats: int = 10) -> tuple[float, str]:
    """FLOP/s of back-to-back n^3 matmuls (the best of 3 rounds), and what was measured."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        sync(device)
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * n**3 / best, f"{str(dtype).removeprefix('torch.')} matmul {n}^3 ({device})"


def make_inputs(batch: int, size: int, tokens: int, dim: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, tokens + 1, (batch,), generator=g)
    return {"x": torch.randn(batch, 4, size, size, generator=g).to(device),  # (B, 4, h, w)
            "t": torch.randint(0, 1000, (batch,), generator=g).float().to(device),  # (B,)
            "context": torch.randn(batch, tokens, dim, generator=g).to(device),  # (B, L, D)
            "mask": (torch.arange(tokens)[None, :] < lengths[:, None]).to(device),  # (B, L) True = token
            "target": torch.randn(batch, 4, size, size, generator=g).to(device)}


def ours_forward(model, inp):
    return model(inp["x"], inp["t"], inp["context"], inp["mask"])


def channels_last_forward(model, inp):
    """What train.channels_last does: NHWC activations (weights stay NCHW, as DeepSpeed keeps them)."""
    return ours_forward(model, {**inp, "x": inp["x"].contiguous(memory_format=torch.channels_last)})


def diffusers_forward(model, inp):
    return model(inp["x"], inp["t"], inp["context"], encoder_attention_mask=inp["mask"]).sample


class Step:
    """One training step of a model (eager or compiled forward) on fixed inputs; the optimizer is the model's."""

    def __init__(self, model: torch.nn.Module, forward: Callable, device: str, opt: torch.optim.Optimizer):
        self.model, self.forward, self.device, self.opt = model, forward, device, opt

    def __call__(self, inp: dict[str, torch.Tensor]) -> None:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda"):
            out = self.forward(self.model, inp)
        F.mse_loss(out.float(), inp["target"]).backward()
        self.opt.step()

    def time(self, inp, warmup: int, steps: int) -> list[float]:
        for _ in range(warmup):
            self(inp)
        times = []
        for _ in range(steps):
            sync(self.device)
            start = time.perf_counter()
            self(inp)
            sync(self.device)
            times.append(time.perf_counter() - start)
        return times

    def flops(self, inp) -> int:
        with FlopCounterMode(display=False) as counter:
            with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda"):
                out = self.forward(self.model, inp)
            F.mse_loss(out.float(), inp["target"]).backward()
        self.model.zero_grad(set_to_none=True)
        return counter.get_total_flops()


def fits(steps: list[Step], batch: int, size: int, tokens: int, dim: int) -> bool:
    """One step of every model at this batch runs in 85 % of the GPU's memory."""
    try:
        for step in steps:
            torch.cuda.reset_peak_memory_stats()
            step(make_inputs(batch, size, tokens, dim, "cuda"))
            torch.cuda.synchronize()
            if torch.cuda.max_memory_allocated() > 0.85 * torch.cuda.get_device_properties(0).total_memory:
                return False
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        for step in steps:
            step.opt.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def fill_batch(steps: list[Step], size: int, tokens: int, dim: int, start: int = 8, cap: int = 1024) -> int:
    batch = start
    while batch * 2 <= cap and fits(steps, batch * 2, size, tokens, dim):
        batch *= 2
    return batch
