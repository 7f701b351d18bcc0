"""Benchmark the GPU path: the SD-1.5-shaped UNet's train step, ours against diffusers' UNet2DConditionModel,
eager and compiled (and ours with channels-last activations), and the whole trainer's images/s from cached latents.

Train step = forward + MSE loss + backward + fused AdamW, under bf16 autocast with fp32 weights (AMP), at
256 px (32x32x4 latents) and 512 px (64x64x4), 77 tokens of 768-d context with padding masked. The batch
fills the GPU: doubled from 8 while a step fits in 85 % of the memory (the same batch for both models).
Achieved TFLOP/s = FLOPs of one step (torch's FlopCounterMode) / median step time; MFU = that over the bf16
matmul peak measured in the same run (8192^3 products). The trainer figure runs `ldm-train` (DeepSpeed
ZeRO-2, bf16) on pre-encoded latents and times the steps between two progress-bar updates, then stops it.

    python -m bench.bench_gpu [--json results.json]      # a CUDA GPU: the full run (~5 min on one H200)
    python -m bench.bench_gpu --tiny                     # CPU dry run (auto without CUDA): tiny sizes, < 2 min

Parts run in order of priority and are skipped (and reported so) once --budget-s is spent.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"speedup_vs_diffusers": 1.2, "mfu": 0.45, "img_per_s": 500.0}  # one H200, bf16, 256 px


def matmul_peak(device: str, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """FLOP/s of back-to-back n^3 matmuls (the best of 3 rounds)."""
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
    return 2 * n**3 / best


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_inputs(batch: int, size: int, tokens: int, dim: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, tokens + 1, (batch,), generator=g)
    return {"x": torch.randn(batch, 4, size, size, generator=g).to(device),  # (B, 4, h, w)
            "t": torch.randint(0, 1000, (batch,), generator=g).float().to(device),  # (B,)
            "context": torch.randn(batch, tokens, dim, generator=g).to(device),  # (B, L, D)
            "mask": (torch.arange(tokens)[None, :] < lengths[:, None]).to(device),  # (B, L) True = token
            "target": torch.randn(batch, 4, size, size, generator=g).to(device)}


class Step:
    """One training step of a model (ours or diffusers', eager or compiled) on fixed inputs."""

    def __init__(self, model: torch.nn.Module, forward: Callable, device: str, amp: bool):
        self.model, self.forward, self.device, self.amp = model, forward, device, amp
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)

    def __call__(self, inp: dict[str, torch.Tensor]) -> None:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.amp):
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


def ours_forward(model, inp):
    return model(inp["x"], inp["t"], inp["context"], inp["mask"])


def channels_last_forward(model, inp):
    """What train.channels_last does: NHWC activations (weights stay NCHW, as DeepSpeed keeps them)."""
    return ours_forward(model, {**inp, "x": inp["x"].contiguous(memory_format=torch.channels_last)})


def diffusers_forward(model, inp):
    return model(inp["x"], inp["t"], inp["context"], encoder_attention_mask=inp["mask"]).sample


def step_flops(step: Step, inp) -> int:
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(step.device, dtype=torch.bfloat16, enabled=step.amp):
            out = step.forward(step.model, inp)
        F.mse_loss(out.float(), inp["target"]).backward()
    step.model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def fits(steps: list[Step], batch: int, size: int, tokens: int, dim: int, device: str) -> bool:
    """One step of every model at this batch runs in 85 % of the GPU's memory."""
    try:
        for step in steps:
            torch.cuda.reset_peak_memory_stats()
            step(make_inputs(batch, size, tokens, dim, device))
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


def fill_batch(steps: list[Step], size: int, tokens: int, dim: int, device: str, start: int = 8, cap: int = 1024) -> int:
    batch = start
    while batch * 2 <= cap and fits(steps, batch * 2, size, tokens, dim, device):
        batch *= 2
    return batch


class UNetBench:
    """Ours and diffusers' UNet of one preset (same weights), their eager steps, and timed variants."""

    def __init__(self, args, device: str, preset: str, peak: float):
        import diffusers

        from ldm.models import UNet, unet_preset

        torch.manual_seed(0)
        ours = UNet(**unet_preset(preset)).to(device).train()
        ref = diffusers.UNet2DConditionModel(**ours.to_diffusers_config()).to(device).train()
        ref.load_state_dict(ours.state_dict(), strict=True)
        self.args, self.device, self.peak, self.dim = args, device, peak, ours.config["context_dim"]
        amp = device == "cuda"
        self.eager = {"ours": Step(ours, ours_forward, device, amp), "diffusers": Step(ref, diffusers_forward, device, amp)}
        self.batches: dict[int, int] = {}

    def batch(self, size: int) -> int:
        if size not in self.batches:
            a = self.args
            self.batches[size] = a.batch or (fill_batch(list(self.eager.values()), size, a.tokens, self.dim, self.device)
                                             if self.device == "cuda" else 4)
        return self.batches[size]

    def run(self, name: str, size: int, compiled: bool, channels_last: bool = False) -> dict[str, Any]:
        batch, args = self.batch(size), self.args
        inp = make_inputs(batch, size, args.tokens, self.dim, self.device)
        flops = step_flops(self.eager["ours"], inp)  # the same arithmetic for both models, eager or compiled
        step, compile_s = self.eager[name], 0.0
        if channels_last:
            step = Step(step.model, channels_last_forward, self.device, step.amp)
            step.opt = self.eager[name].opt
        if compiled:
            start = time.perf_counter()
            step = Step(step.model, torch.compile(step.forward), self.device, step.amp)
            step.opt = self.eager[name].opt
            step(inp)  # compiles
            compile_s = time.perf_counter() - start
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        med = statistics.median(step.time(inp, args.warmup, args.steps))
        return {"part": label(name, size, compiled, channels_last), "model": name, "compiled": compiled,
                "channels_last": channels_last, "latent": size,
                "batch": batch, "step_s": med, "img_per_s": batch / med, "tflops": flops / med / 1e12,
                "mfu": flops / med / self.peak, "compile_s": compile_s,
                "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if self.device == "cuda" else None}


def label(name: str, size: int, compiled: bool, channels_last: bool = False) -> str:
    return f"{name} {'compiled' if compiled else 'eager'}{' channels-last' if channels_last else ''} {size * 8}px"


def plan(sizes: list[int], compile_sizes: list[int]) -> list[tuple]:
    """Parts in order of priority: eager at the first size, the trainer, compiled there, ours eager with channels-last
    activations (does train.channels_last win?), then the rest."""
    first, rest = sizes[0], sizes[1:]
    parts: list[tuple] = [("unet", m, first, False) for m in ("ours", "diffusers")] + [("trainer",)]
    parts += [("unet", m, first, True) for m in ("ours", "diffusers") if first in compile_sizes]
    parts += [("unet", "ours", first, False, True)]
    for size in rest:
        parts += [("unet", m, size, False) for m in ("ours", "diffusers")]
        parts += [("unet", m, size, True) for m in ("ours", "diffusers") if size in compile_sizes]
    return parts


def trainer_images_per_s(args, device: str, tiny: bool, batch: int, work: Path) -> dict[str, Any]:
    """ldm-train on cached latents: images/s between the progress bar's first and last observed step."""
    from bench.offline_assets import latent_shards, shapes_dataset, tiny_autoencoder, tiny_text_encoder, \
        training_overrides

    image = 16 if tiny else 256
    channels = (8, 16) if tiny else (8, 8, 8, 8)  # 256 px -> 32x32x4 latents (downsampling 8)
    shards = shapes_dataset(work / "shapes", count=max(48, 2 * batch), image_size=image)
    ae = tiny_autoencoder(shards, work / "autoencoder", image, channels, steps=2)
    latents = latent_shards(shards, ae, work / "latents", image, device)
    text = tiny_text_encoder(work / "text_encoder", hidden=32 if tiny else 768)
    first, last = (2, 6) if tiny else (5, args.trainer_steps)
    overrides = training_overrides(shards, ae, text, work / "run", image, f"data.latents={latents}",
                                   f"data.batch_size={batch}", f"model.preset={'tiny' if tiny else 'sd15'}",
                                   f"run.device={device}", "train.zero_stage=2", f"train.max_steps={last + 1000}",
                                   "train.ckpt_every=1000000", "train.log_every=1000000",
                                   f"train.precision={'fp32' if tiny else 'bf16'}", "text_encoder.max_length=77",
                                   *args.trainer_set)
    cmd = [sys.executable, "-m", "ldm.cli.train", "--config", str(ROOT / "configs/ldm/emoji.yaml"), *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    seen: dict[int, float] = {}
    tail = b""
    try:
        while proc.poll() is None and last not in seen:
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                break
            now, tail = time.perf_counter(), (tail + chunk)[-4096:]
            for n in re.findall(rb"ldm:[^|\r\n]*\|[^|\r\n]*\|\s*(\d+)/\d+", chunk):
                seen.setdefault(int(n), now)
            if max(seen, default=0) >= last:
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # measured: no checkpoint or export needed
        proc.wait()
    steps = sorted(s for s in seen if s >= first)
    if len(steps) < 2:
        return {"part": "trainer (cached latents)", "error": "no progress seen", "log": tail.decode(errors="replace")[-800:]}
    a, b = steps[0], steps[-1]
    return {"part": "trainer (cached latents)", "model": "tiny" if tiny else "sd15", "batch": batch,
            "steps": b - a, "img_per_s": (b - a) * batch / (seen[b] - seen[a]), "step_s": (seen[b] - seen[a]) / (b - a)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (the default without CUDA)")
    parser.add_argument("--sizes", default=None, help="latent sizes, comma-separated (default 32,64; tiny: 8)")
    parser.add_argument("--compile-sizes", default=None, help="sizes also run compiled (default 32; tiny: none)")
    parser.add_argument("--batch", type=int, default=0, help="fixed batch (default: fill the GPU)")
    parser.add_argument("--tokens", type=int, default=77)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10; tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny 1)")
    parser.add_argument("--trainer-steps", type=int, default=40, help="last trainer step timed (from step 5)")
    parser.add_argument("--no-trainer", action="store_true")
    parser.add_argument("--trainer-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the trainer part, e.g. train.compile=model (repeatable)")
    parser.add_argument("--budget-s", type=float, default=330.0, help="skip the remaining parts after this")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tiny = args.tiny or device == "cpu"
    ints = lambda s: [int(v) for v in s.split(",") if v.strip()]  # noqa: E731
    args.sizes = ints(args.sizes or ("8" if tiny else "32,64"))
    args.compile_sizes = ints(args.compile_sizes if args.compile_sizes is not None else ("" if tiny else "32"))
    args.steps, args.warmup = args.steps or (2 if tiny else 10), args.warmup if args.warmup is not None else (1 if tiny else 3)
    if tiny:
        args.tokens = min(args.tokens, 8)
    if device == "cuda":
        from ldm.precision import use_tf32

        use_tf32()  # the fp32 parts of AMP (the optimizer, the loss) as an fp32 training run has them
    start = time.perf_counter()
    budget = lambda: time.perf_counter() - start < args.budget_s  # noqa: E731

    import diffusers

    peak = matmul_peak(device, torch.bfloat16 if device == "cuda" else torch.float32, 8192 if device == "cuda" else 512)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    result: dict[str, Any] = {"device": name, "torch": torch.__version__, "diffusers": diffusers.__version__,
                              "tiny": tiny, "peak_tflops": peak / 1e12,
                              "peak_kind": "bf16 matmul 8192^3" if device == "cuda" else "fp32 matmul 512^3 (CPU)",
                              "rows": []}
    unets = UNetBench(args, device, "tiny" if tiny else "sd15", peak)
    for part in plan(args.sizes, args.compile_sizes):
        if part[0] == "trainer":
            if args.no_trainer:
                continue
            if not budget():
                result["trainer"] = {"part": "trainer (cached latents)", "skipped": "time budget spent"}
                continue
            batch = unets.batch(args.sizes[0])
            for attempt in (batch, batch // 2):  # DeepSpeed's bf16 optimizer holds more than AMP: halve once
                with tempfile.TemporaryDirectory(prefix="bench_gpu_") as work:
                    result["trainer"] = trainer_images_per_s(args, device, tiny, max(attempt, 1), Path(work))
                if "error" not in result["trainer"] or attempt < 2:
                    break
            continue
        _, model, size, compiled, *layout = part
        if not budget():
            result["rows"].append({"part": label(model, size, compiled, *layout), "skipped": "time budget spent"})
            continue
        result["rows"].append(unets.run(model, size, compiled, *layout))
    eager = {r["model"]: r for r in result["rows"] if r.get("latent") == args.sizes[0] and r.get("compiled") is False
             and not r.get("channels_last")}
    if {"ours", "diffusers"} <= set(eager):
        result["speedup_vs_diffusers"] = eager["diffusers"]["step_s"] / eager["ours"]["step_s"]
    result["wall_s"] = time.perf_counter() - start
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def report(result: dict[str, Any]) -> str:
    lines = [f"{result['device']}: torch {result['torch']}, diffusers {result['diffusers']}, "
             f"peak {result['peak_tflops']:.1f} TFLOP/s ({result['peak_kind']}){' [tiny dry run]' if result['tiny'] else ''}"]
    for r in result["rows"] + ([result["trainer"]] if "trainer" in result else []):
        if "step_s" not in r:
            lines.append(f"  {r['part']:<32} {r.get('skipped') or r.get('error')}")
            continue
        extra = (f"{r['tflops']:7.1f} TFLOP/s  MFU {100 * r['mfu']:5.1f} %" if "tflops" in r else f"{r['steps']} steps")
        if r.get("compile_s"):
            extra += f"  (compile {r['compile_s']:.0f} s)"
        lines.append(f"  {r['part']:<32} batch {r['batch']:>4}  {1e3 * r['step_s']:8.1f} ms/step  "
                     f"{r['img_per_s']:8.1f} img/s  {extra}")
    if "speedup_vs_diffusers" in result:
        lines.append(f"  ours vs diffusers (eager, first size): {result['speedup_vs_diffusers']:.2f}x "
                     f"(target >= {TARGETS['speedup_vs_diffusers']}x on one H200)")
    lines.append(f"  targets on one H200 at 256 px: MFU >= {100 * TARGETS['mfu']:.0f} %, >= {TARGETS['img_per_s']:.0f} img/s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
