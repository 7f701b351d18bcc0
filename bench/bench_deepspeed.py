"""Benchmark P2: what DeepSpeed costs per training step, and what ZeRO saves per rank.

1. Step time: the trainer's DeepSpeed engine (ZeRO-0 and ZeRO-1, fp32, the config `ldm-train` builds from
   TrainConfig: AdamW, clipping, LR schedule) against a plain torch loop doing the same arithmetic (forward, MSE,
   backward, clip_grad_norm_, AdamW, LambdaLR) on the emoji-cpu UNet with identical weights and batch, one
   process, the same threads. Repeats are interleaved; medians of wall and process CPU time. Target: the
   engine's overhead <= 5%.
2. Memory: per-rank optimizer state (AdamW moments and fp32 master copies), gradient and parameter bytes held
   for ZeRO 0/1/2/3 with 2 processes (torchrun, gloo), read from the engines after one step.

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_deepspeed --repeats 15
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bench.bench_unet import make_inputs

STAGES = (0, 1, 2, 3)


def build(seed: int = 0):
    from ldm.models import UNet, unet_preset

    torch.manual_seed(seed)
    return UNet(**unet_preset("emoji-cpu")).train()


def train_config():
    from ldm.config import TrainConfig

    return TrainConfig(lr=1e-4, warmup_steps=10, lr_schedule="cosine", max_steps=1000, grad_clip=1.0)


def engine_for(model, stage: int, batch: int):
    import deepspeed

    from ldm.train.engine import deepspeed_config, lr_lambda

    cfg = train_config()
    cfg.zero_stage = stage
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(cfg, batch),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
    return engine


def step_time(args) -> dict[str, float]:
    from ldm.train.distributed import init_distributed
    from ldm.train.engine import lr_lambda

    init_distributed("cpu")
    torch.set_num_threads(args.threads)
    inp = make_inputs(args.batch, args.tokens, 384)
    x, t, context, mask, target = inp["x"], inp["t"], inp["context"], inp["mask"], inp["target"]

    plain = build()
    cfg = train_config()
    opt = torch.optim.AdamW(plain.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay,
                            fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))

    def plain_step():
        opt.zero_grad(set_to_none=True)
        F.mse_loss(plain(x, t, context, mask), target).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()

    runs = {"torch": plain_step}
    for stage in args.stages:
        engine = engine_for(build(), stage, args.batch)

        def ds_step(engine=engine):
            loss = F.mse_loss(engine(x, t, context, mask), target)
            engine.backward(loss)
            engine.step()

        runs[f"deepspeed zero{stage}"] = ds_step

    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for i in range(args.warmup + args.repeats):
        names = list(runs) if i % 2 == 0 else list(reversed(runs))
        for name in names:
            start, start_cpu = time.perf_counter(), time.process_time()
            runs[name]()
            if i >= args.warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    print(f"step time: emoji-cpu UNet, batch {args.batch}, fp32, {torch.get_num_threads()} thread(s), "
          f"{args.repeats} interleaved repeats (medians)")
    ref_wall, ref_cpu = statistics.median(wall["torch"]), statistics.median(cpu["torch"])
    out = {}
    for name in runs:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        pairs = statistics.median(a / b for a, b in zip(wall[name], wall["torch"]))
        out[name] = c / ref_cpu
        print(f"  {name:>15}: {w * 1e3:7.1f} ms wall, {c * 1e3:7.1f} ms CPU   "
              f"vs torch: {w / ref_wall:.3f}x wall, {pairs:.3f}x interleaved pairs, {c / ref_cpu:.3f}x CPU"
              + ("" if name == "torch" else f"   overhead {100 * (c / ref_cpu - 1):+.1f}% (target <= +5%)"))
    return out


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def memory_worker(stages: list[int]) -> None:
    """Inside torchrun: per stage, one step, then the bytes this rank holds; rank 0 prints JSON lines."""
    from ldm.train.distributed import init_distributed

    dist = init_distributed("cpu")
    inp = make_inputs(2, 16, 384)
    for stage in stages:
        engine = engine_for(build(), stage, 2)
        loss = F.mse_loss(engine(inp["x"], inp["t"], inp["context"], inp["mask"]), inp["target"])
        engine.backward(loss)
        engine.step()
        opt = engine.optimizer
        base = getattr(opt, "optimizer", opt)  # ZeRO wraps the torch optimizer
        moments = _bytes(v for state in base.state.values() for v in state.values())
        masters = 0  # fp32 master partitions ZeRO keeps beside the (possibly partitioned) parameters
        for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            masters += _bytes(getattr(opt, attr, []) or [])
        params = _bytes(getattr(p, "ds_tensor", p.data) for p in engine.module.parameters())
        row = {"stage": stage, "rank": dist.rank, "moments": moments, "masters": masters, "params": params}
        rows = [None] * dist.world_size
        torch.distributed.all_gather_object(rows, row)
        if dist.is_main:
            print("MEM " + json.dumps(rows), flush=True)
        del engine, opt, base
        torch.distributed.barrier()


def memory(args) -> dict[int, dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "bench.bench_deepspeed", "--memory-worker", "--stages", *map(str, STAGES)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-3000:])
    table = {}
    for line in proc.stdout.splitlines():
        if line.startswith("MEM "):
            rows = json.loads(line[4:])
            table[rows[0]["stage"]] = rows
    full = table[0][0]["params"]
    print(f"per-rank memory with 2 processes (emoji-cpu UNet, {full / 2**20:.1f} MiB of fp32 parameters):")
    print("  stage | AdamW moments | fp32 masters | parameters held | moments vs ZeRO-0")
    for stage, rows in sorted(table.items()):
        r = rows[0]
        print(f"  ZeRO-{stage} | {r['moments'] / 2**20:10.1f} MiB | {r['masters'] / 2**20:9.1f} MiB | "
              f"{r['params'] / 2**20:12.1f} MiB | {r['moments'] / table[0][0]['moments']:.2f}x")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.memory_worker:
        memory_worker(args.stages)
        return
    if not args.skip_memory:
        memory(args)
    step_time(args)


if __name__ == "__main__":
    main()
