"""Benchmark P1: one training step of our UNet vs diffusers' UNet2DConditionModel of identical configuration.

A step is forward + MSE loss + backward + AdamW step on the emoji-cpu preset (batch 32, 8x8x4 latents,
16 MiniLM tokens of 384-d with padding masked, as in training). Both models hold the same weights, use the
same optimizer (torch's fused AdamW, as the trainer does; ``--loop-adam`` for the per-tensor loop) and run
in the same process on the same threads (``--threads``, default all); repeats are interleaved (the order
alternates) and medians are compared, of wall-clock time and of process CPU time (which time slices lost to
other processes on a shared machine do not inflate), and the fastest decile of CPU times (the steps least
disturbed by other processes' use of the caches). Achieved FLOP/s (counted by torch's FlopCounterMode) is set against a
matmul peak measured in the same run. On a busy machine the ratios move by several percent from run to
run: repeat, and prefer more repeats.

    .venv/bin/python -m bench.bench_unet --repeats 30 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ldm.cli._common import retain_freed_memory
from ldm.models import UNet, unet_preset


def make_inputs(batch: int, tokens: int, dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Latents, timesteps, a padded context with its mask, and the noise target."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, tokens + 1, (batch,), generator=g)  # caption lengths incl. special tokens
    return {
        "x": torch.randn(batch, 4, 8, 8, generator=g),  # (B, 4, 8, 8)
        "t": torch.randint(0, 1000, (batch,), generator=g).float(),  # (B,)
        "context": torch.randn(batch, tokens, dim, generator=g),  # (B, L, D)
        "mask": torch.arange(tokens)[None, :] < lengths[:, None],  # (B, L) True = token
        "target": torch.randn(batch, 4, 8, 8, generator=g),  # (B, 4, 8, 8)
    }


def train_step(forward: Callable[[], torch.Tensor], target: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    """Forward, MSE loss, backward and one AdamW step."""
    opt.zero_grad(set_to_none=True)
    F.mse_loss(forward(), target).backward()
    opt.step()


def matmul_peak(n: int = 1024, repeats: int = 5) -> float:
    """Best fp32 matmul throughput (FLOP/s) of an n x n x n product on the current threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the interleaved comparison and print medians, the speed ratio and FLOP/s."""
    import diffusers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--no-mask", action="store_true", help="no padding mask (every token attended)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--loop-adam", action="store_true", help="torch's per-tensor AdamW loop instead of fused")
    args = parser.parse_args(argv)
    retain_freed_memory()  # as every ldm-* command runs (fewer page faults for both models)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    ours = UNet(**unet_preset("emoji-cpu")).train()
    ref = diffusers.UNet2DConditionModel(**ours.to_diffusers_config()).train()
    ref.load_state_dict(ours.state_dict(), strict=True)  # identical weights: identical arithmetic to do
    inp = make_inputs(args.batch, args.tokens, ours.config["context_dim"])
    mask = None if args.no_mask else inp["mask"]
    x, t, context, target = inp["x"], inp["t"], inp["context"], inp["target"]
    adam = {"lr": 1e-4, "fused": not args.loop_adam}
    runs = {
        "ours": (lambda: ours(x, t, context, mask), torch.optim.AdamW(ours.parameters(), **adam)),
        "diffusers": (lambda: ref(x, t, context, encoder_attention_mask=mask).sample,
                      torch.optim.AdamW(ref.parameters(), **adam)),
    }
    with torch.no_grad():
        diff = (runs["ours"][0]() - runs["diffusers"][0]()).abs().max().item()

    with FlopCounterMode(display=False) as counter:
        F.mse_loss(runs["ours"][0](), target).backward()
    flops = counter.get_total_flops()
    ours.zero_grad(set_to_none=True)

    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    peaks = []
    for i in range(args.warmup + args.repeats):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        for name in order:
            forward, opt = runs[name]
            start, start_cpu = time.perf_counter(), time.process_time()
            train_step(forward, target, opt)
            if i >= args.warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        if i >= args.warmup:
            peaks.append(matmul_peak())

    med = {name: statistics.median(v) for name, v in wall.items()}
    med_cpu = {name: statistics.median(v) for name, v in cpu.items()}
    pair_ratio = statistics.median(d / o for d, o in zip(wall["diffusers"], wall["ours"]))
    peak = statistics.median(peaks)
    params = sum(p.numel() for p in ours.parameters())
    print(f"UNet emoji-cpu: {params / 1e6:.2f}M params; batch {args.batch}, 8x8x4 latents, "
          f"{args.tokens} tokens x {ours.config['context_dim']}-d, mask={'no' if mask is None else 'padded'}; "
          f"torch {torch.__version__}, diffusers {diffusers.__version__}, {torch.get_num_threads()} thread(s), "
          f"{'loop' if args.loop_adam else 'fused'} AdamW")
    print(f"max |ours - diffusers| on the forward: {diff:.2e}")
    for name in runs:
        q = sorted(wall[name])
        print(f"{name:>9}: median {med[name] * 1e3:7.1f} ms/step wall (min {q[0] * 1e3:.1f}, max {q[-1] * 1e3:.1f}, "
              f"n={len(q)}), {med_cpu[name] * 1e3:7.1f} ms/step CPU")
    ratio = med["diffusers"] / med["ours"]
    fast = {name: statistics.quantiles(v, n=10)[0] for name, v in cpu.items()}  # fastest-decile CPU time
    print(f"speed-up diffusers/ours: {ratio:.3f}x wall (median of medians), {pair_ratio:.3f}x (median of "
          f"interleaved pairs), {med_cpu['diffusers'] / med_cpu['ours']:.3f}x CPU time, "
          f"{fast['diffusers'] / fast['ours']:.3f}x fastest-decile CPU time")
    achieved = flops / med["ours"]
    print(f"ours: {flops / 1e9:.2f} GFLOP per forward+backward -> {achieved / 1e9:.2f} GFLOP/s; "
          f"fp32 matmul peak 1024^3: {peak / 1e9:.2f} GFLOP/s ({100 * achieved / peak:.0f}% of peak)")
    return {"ours_s": med["ours"], "diffusers_s": med["diffusers"], "ratio": ratio, "pair_ratio": pair_ratio,
            "cpu_ratio": med_cpu["diffusers"] / med_cpu["ours"], "fast_cpu_ratio": fast["diffusers"] / fast["ours"],
            "flops": flops, "peak": peak}


if __name__ == "__main__":
    main()
