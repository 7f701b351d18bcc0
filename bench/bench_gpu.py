"""Benchmark the GPU path in one shot, most important first: the SD-1.5-shaped UNet's train step, ours against
diffusers' UNet2DConditionModel (same weights), with MFU against the bf16 matmul peak measured in the same run; the
whole trainer's images/s and peak memory from cached latents under DeepSpeed ZeRO-2 bf16; then compiled, channels-last,
512 px, the published transformers (PixArt-alpha XL/2, SD3-medium), ZeRO-3, sampling, checkpoint save/load and
bf16-vs-fp32 losses (PARTS below, in priority order).

UNet train step = forward + MSE loss + backward + fused AdamW under bf16 autocast with fp32 weights (AMP), 77 tokens
of 768-d context with padding masked; the batch fills the GPU (doubled from 8 while a step of every model of the part
fits in 85 % of its memory) and later parts at that size reuse it. Achieved TFLOP/s = FLOPs of one step (torch's
FlopCounterMode) / median step time. The trainer parts run `ldm.train.Trainer` itself (its own loop, data stream,
EMA and samples/s metric) on assets made on the spot (bench/offline_assets.py) and stop it once the timed steps are
logged.

Each part runs in a process of its own under one time budget (bench/gpu_runner.py): it starts with the GPU free, the
results (--json, and its table beside it as .md) are rewritten after every part, and a part that cannot finish in what
is left is skipped and reported. Without CUDA (or with --tiny) every part runs with tiny shapes: the CPU dry run.

    python -m bench.bench_gpu --json out/bench_gpu.json          # a CUDA GPU (bench/gpu_check.sh runs this)
    python -m bench.bench_gpu --plan                              # the parts, their expected and longest times
    python -m bench.bench_gpu --parts unet-256,sampling-256       # some parts only
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from bench.gpu_runner import Part, Results, plan, read_record, run_parts, run_process, write_atomic
from bench.gpu_step import (Step, channels_last_forward, diffusers_forward, fill_batch, make_inputs, matmul_peak,
                            memory, ours_forward, peak_setting, sync)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/ldm/emoji.yaml"
TARGETS = {"speedup_vs_diffusers": 1.2, "mfu": 0.45, "img_per_s": 500.0}  # one H200, bf16, 256 px
TESTS = "gpu-tests"

# Priority order. Expected seconds: on one H100/H200 with cold caches, the part's process start included (estimates
# until a run measures them: the JSON records each part's wall time).
PARTS = [
    Part("peak", "bf16 matmul peak, 8192^3 (the MFU denominator)", 15, 60),
    Part("unet-256", "UNet train step, ours vs diffusers, eager, bf16 autocast, 256 px, batch filling the GPU",
         75, 180),
    Part("trainer-zero2-256", "the trainer from cached latents, ZeRO-2 bf16, SD-1.5 UNet, 256 px: img/s, peak memory",
         100, 240),
    Part(TESTS, "pytest -m gpu tests/gpu (only with --gpu-tests)", 180, 270),
    Part("compiled-ours-256", "ours, torch.compile (inductor; cold compile), 256 px", 150, 300),
    Part("compiled-diffusers-256", "diffusers', torch.compile (inductor; cold compile), 256 px", 150, 300),
    Part("channels-last-256", "ours eager with channels-last activations (train.channels_last), 256 px", 45, 120),
    Part("unet-512", "UNet train step, ours vs diffusers, eager, 512 px, batch filling the GPU", 75, 180),
    Part("transformers-512", "DiT (PixArt-alpha XL/2) and MMDiT (SD3-medium) train steps, ours vs diffusers, 512 px",
         150, 360),
    Part("trainer-zero3-256", "the trainer from cached latents, ZeRO-3 bf16, SD-1.5 UNet, 256 px", 100, 240),
    Part("sampling-256", "pipeline img/s: DDIM 20 steps with guidance, 256 px, fp32 and bf16 UNet", 60, 150),
    Part("checkpoint", "checkpoint save and load of the SD-1.5 UNet (860M), ZeRO-2 bf16, with EMA", 75, 200),
    Part("loss-bf16-fp32", "trainer losses, bf16 vs fp32, SD-1.5 UNet, 5 steps, same init, data and noise", 90, 240),
]


@dataclass
class Context:
    """What a part's process knows: its settings, the device, a work folder shared by the parts (assets), and the
    results of the parts before it (the peak, the batch a size was filled to)."""

    args: argparse.Namespace
    work: Path
    known: dict[str, Any]
    cuda: bool = field(default_factory=torch.cuda.is_available)

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    @property
    def tiny(self) -> bool:
        return self.args.tiny or not self.cuda

    @property
    def sizes(self) -> tuple[int, int]:
        return (8, 16) if self.tiny else (32, 64)  # latent sizes: 256 and 512 px (tiny: the dry run's)

    @property
    def image(self) -> int:
        """The trainer parts' image size: 256 px (the tiny autoencoder downsamples 8x); tiny: 16 px (2x)."""
        return self.sizes[0] * (2 if self.tiny else 8)

    def done(self, name: str) -> dict[str, Any]:
        record = self.known.get("parts", {}).get(name, {})
        return record if record.get("status") == "done" else {}

    def peak(self) -> float:
        """The matmul peak (FLOP/s) the peak part measured, else measured now."""
        measured = self.done("peak").get("peak_tflops")
        return measured * 1e12 if measured else matmul_peak(self.device, *peak_setting(self.cuda))[0]

    def batch(self, size: int) -> int | None:
        """--batch, else the batch an earlier part filled at this latent size."""
        if self.args.batch:
            return self.args.batch
        found = [r["batch"] for r in self.known.get("parts", {}).values()
                 if r.get("status") == "done" and r.get("latent") == size and r.get("filled")]
        return found[0] if found else None


# --- the UNet's train step -------------------------------------------------------------------------------------------


def measure_unet(ctx: Context, level: int, models: tuple[str, ...], compiled: bool = False,
                 channels_last: bool = False) -> dict[str, Any]:
    """Train steps of ``models`` (ours, diffusers': the same weights) at latent size ``ctx.sizes[level]``."""
    import diffusers

    from ldm.models import UNet, unet_preset
    from ldm.precision import use_tf32

    if ctx.cuda:
        use_tf32()  # the fp32 parts of AMP (the optimizer, the loss) as an fp32 training run has them
    size, args, device = ctx.sizes[level], ctx.args, ctx.device
    torch.manual_seed(0)
    with torch.device(device):  # made on the GPU: an 860M-parameter initialisation on the CPU takes long
        ours = UNet(**unet_preset("tiny" if ctx.tiny else "sd15")).train()
        nets: dict[str, torch.nn.Module] = {"ours": ours}
        if "diffusers" in models:
            nets["diffusers"] = diffusers.UNet2DConditionModel(**ours.to_diffusers_config()).train()
            nets["diffusers"].load_state_dict(ours.state_dict(), strict=True)
    dim = ours.config["context_dim"]
    nets = {name: nets[name] for name in models}  # drops ours when only diffusers' is measured
    del ours
    tokens = min(args.tokens, 8) if ctx.tiny else args.tokens
    eager = {name: Step(net, ours_forward if name == "ours" else diffusers_forward, device,
                        torch.optim.AdamW(net.parameters(), lr=1e-6, fused=True)) for name, net in nets.items()}
    batch = ctx.batch(size)
    filled = batch is None
    if filled:
        batch = fill_batch(list(eager.values()), size, tokens, dim) if ctx.cuda else 4
    inp = make_inputs(batch, size, tokens, dim, device)
    flops = next(iter(eager.values())).flops(inp)  # the same arithmetic for every model and variant
    peak = ctx.peak()
    variant = "compiled" if compiled else "eager" + (" channels-last" if channels_last else "")
    rows = []
    for name, step in eager.items():
        forward = channels_last_forward if channels_last else step.forward
        compile_s = 0.0
        if compiled:
            forward = torch.compile(forward, backend="inductor" if ctx.cuda else "aot_eager")  # CPU: no C++ build
        timed = Step(step.model, forward, device, step.opt)
        if compiled:
            start = time.perf_counter()
            timed(inp)
            sync(device)
            compile_s = time.perf_counter() - start
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
        med = statistics.median(timed.time(inp, args.warmup, args.steps))
        rows.append({"label": f"{name} {variant}, {size * 8} px", "model": name, "batch": batch, "step_s": med,
                     "img_per_s": batch / med, "tflops": flops / med / 1e12, "mfu": flops / med / peak,
                     "compile_s": compile_s, **memory(device)})
    result = {"rows": rows, "batch": batch, "latent": size, "filled": filled, "flops_per_image": flops / batch,
              "diffusers": diffusers.__version__}
    if len(rows) == 2:
        result["speedup_vs_diffusers"] = rows[1]["step_s"] / rows[0]["step_s"]
    return result


# the published transformers at 512 px (64x64 latents): preset, latent channels, text tokens, their width, the pooled
# width, batch (fixed: SD3-medium's pair with its optimizer state fills most of an H100); tiny: the dry run's
PUBLISHED = {"dit": ("pixart-xl-2-512", 4, 120, 4096, 0, 16), "mmdit": ("sd3-medium", 16, 333, 4096, 2048, 4)}
TINY_PUBLISHED = {"dit": ("tiny", 4, 8, 32, 0, 2), "mmdit": ("tiny", 4, 8, 32, 32, 2)}


def measure_transformers(ctx: Context) -> dict[str, Any]:
    """Train steps of our DiT and MMDiT against diffusers' PixArtTransformer2DModel / SD3Transformer2DModel at the
    published shapes (the same weights, bf16 autocast, one model pair at a time). The optimizer is SGD: two 2B-parameter
    models with AdamW's state do not fit an H100 together, and the optimizer step is the same arithmetic for both."""
    import diffusers

    from bench.bench_transformers import make_inputs as transformer_inputs
    from bench.bench_transformers import pairs

    args, device, rows, ratios = ctx.args, ctx.device, [], {}
    side = ctx.sizes[1]
    for kind, (preset, channels, tokens, dim, pooled, batch) in (TINY_PUBLISHED if ctx.tiny else PUBLISHED).items():
        inp = {k: v.to(device) for k, v in transformer_inputs(batch, tokens, channels, side, dim, pooled or dim).items()}
        with torch.device(device):  # made on the GPU: a 2B-parameter initialisation on the CPU takes minutes
            runs = pairs([kind], preset, channels, inp, mmdit_mask=False, unet=False)
        steps = {}
        for name, (forward, opt) in runs.items():
            sgd = torch.optim.SGD([p for g in opt.param_groups for p in g["params"]], lr=1e-6)
            steps[name] = Step(torch.nn.Module(), lambda _model, _inp, forward=forward: forward(), device, sgd)
        flops = next(iter(steps.values())).flops(inp)
        for name, step in steps.items():
            if ctx.cuda:
                torch.cuda.reset_peak_memory_stats()
            med = statistics.median(step.time(inp, args.warmup, args.steps))
            rows.append({"label": f"{name} ({preset}), {side * 8} px", "model": name, "batch": batch, "step_s": med,
                         "img_per_s": batch / med, "tflops": flops / med / 1e12, "mfu": flops / med / ctx.peak(),
                         **memory(device)})
        ratios[kind] = rows[-1]["step_s"] / rows[-2]["step_s"]  # diffusers' time over ours
        del runs, steps
        free_memory()
    return {"rows": rows, "latent": side, "speedup_vs_diffusers": ratios, "diffusers": diffusers.__version__}


def measure_peak(ctx: Context) -> dict[str, Any]:
    peak, kind = matmul_peak(ctx.device, *peak_setting(ctx.cuda))
    info = {"device": torch.cuda.get_device_name(0) if ctx.cuda else "CPU", "torch": torch.__version__,
            "cuda": torch.version.cuda, "peak_tflops": peak / 1e12, "peak_kind": kind}
    if ctx.cuda:
        info["memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return {**info, "rows": [{"label": kind, "tflops": peak / 1e12}]}


# --- the trainer --------------------------------------------------------------------------------------------------


class Measured(Exception):
    """Raised from the trainer's metric hook to end its loop once the measured steps are logged."""


def trainer_assets(ctx: Context, batch: int) -> dict[str, Path]:
    """Shape-image shards, a tiny autoencoder (downsampling 8; tiny: 2), their latents and a random BERT (768-d; tiny:
    32-d), made once in the work folder and shared by the parts."""
    from bench.offline_assets import latent_shards, shapes_dataset, tiny_autoencoder, tiny_text_encoder

    image = ctx.image
    folder = ctx.work / f"assets-{image}px"
    ready = folder / "ready.json"
    if ready.exists():
        return {k: Path(v) for k, v in json.loads(ready.read_text()).items()}
    shutil.rmtree(folder, ignore_errors=True)  # what a stopped part left half made
    shards = shapes_dataset(folder / "shapes", count=max(48, 2 * batch), image_size=image)
    ae = tiny_autoencoder(shards, folder / "autoencoder", image, (8, 16) if ctx.tiny else (8, 8, 8, 8), steps=2)
    paths = {"shards": shards, "autoencoder": ae,
             "latents": latent_shards(shards, ae, folder / "latents", image, ctx.device),
             "text_encoder": tiny_text_encoder(folder / "text_encoder", hidden=32 if ctx.tiny else 768)}
    write_atomic(ready, json.dumps({k: str(v) for k, v in paths.items()}))
    return paths


def trainer_config(ctx: Context, batch: int, run: str, *extra: str, zero_stage: int = 2, precision: str = "bf16"):
    """configs/ldm/emoji.yaml on the assets: the SD-1.5 UNet (tiny: the tiny one) on cached latents, 77 tokens."""
    from bench.offline_assets import training_overrides
    from ldm.config import LDMConfig, load_config

    assets = trainer_assets(ctx, batch)
    overrides = training_overrides(
        assets["shards"], assets["autoencoder"], assets["text_encoder"], ctx.work / run, ctx.image,
        f"data.latents={assets['latents']}", f"data.batch_size={batch}",
        f"model.preset={'tiny' if ctx.tiny else 'sd15'}", f"run.device={ctx.device}", f"train.zero_stage={zero_stage}",
        f"train.precision={precision}", "train.lr=1e-4", "train.ckpt_every=1000000", "text_encoder.max_length=77",
        *extra, *ctx.args.trainer_set)
    return load_config(LDMConfig, CONFIG, overrides)


def run_trainer(ctx: Context, cfg, stop_at: int):
    """Train until the metrics of step ``stop_at`` are logged; (trainer, {step: metrics + memory at that step})."""
    from ldm.train.trainer import Trainer

    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()  # the trainer's own peak, not the assets' made before it
    trainer, logged = Trainer(cfg), {}

    def capture(metrics: dict[str, float], step: int) -> None:
        logged[step] = {**metrics, **memory(ctx.device)}
        if step >= stop_at:
            raise Measured

    trainer.tracker.log_metrics = capture
    try:
        trainer.train()
    except Measured:
        pass
    return trainer, logged


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_trainer(ctx: Context, zero_stage: int) -> dict[str, Any]:
    """Images/s of steps n+1..2n (the trainer's own samples/s over its log window), at the batch the UNet part filled
    (halved once if DeepSpeed's state leaves too little room), and the peak memory."""
    n, first = ctx.args.trainer_steps, ctx.batch(ctx.sizes[0]) or (4 if ctx.tiny else 64)
    note = ""
    for batch in dict.fromkeys((first, max(first // 2, 1))):
        try:
            cfg = trainer_config(ctx, batch, f"run-zero{zero_stage}", f"train.max_steps={2 * n}",
                                 f"train.log_every={n}", zero_stage=zero_stage)
            _, logged = run_trainer(ctx, cfg, 2 * n)
            break
        except torch.cuda.OutOfMemoryError:
            if batch == max(first // 2, 1):
                raise
            note = f"batch {batch} ran out of memory, halved; "
            free_memory()
    m = logged[2 * n]
    row = {"label": f"trainer ZeRO-{zero_stage} bf16, cached latents, {ctx.image} px", "batch": batch,
           "step_s": batch / m["train/samples_per_s"], "img_per_s": m["train/samples_per_s"],
           "peak_gib": m.get("peak_gib"), "reserved_gib": m.get("reserved_gib"),
           "note": note + f"steps {n + 1}-{2 * n}"}
    per_image = ctx.done("unet-256").get("flops_per_image")
    if per_image:
        row["tflops"] = per_image * row["img_per_s"] / 1e12
        row["mfu"] = row["tflops"] * 1e12 / ctx.peak()
    return {"rows": [row], "batch": batch, "latent": ctx.sizes[0], "img_per_s": row["img_per_s"],
            "peak_gib": row["peak_gib"]}


def measure_sampling(ctx: Context) -> dict[str, Any]:
    """The text-to-image pipeline (text encoder, DDIM with classifier-free guidance, decoder) with the SD-1.5 UNet at
    random weights: images/s for a batch of prompts, its UNet in fp32 (as exports load) and in bf16."""
    from bench.offline_assets import COLOURS, SHAPES
    from ldm.assemble import assemble

    parts = assemble(trainer_config(ctx, 4, "run-sampling"), ctx.device)
    torch.manual_seed(0)
    with torch.device(ctx.device):
        unet = parts.unet()
    count, steps = (4, 3) if ctx.tiny else (32, 20)
    prompts = [f"{c} {s}" for c in sorted(COLOURS) for s in SHAPES][:count]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        pipe = parts.pipeline(unet.to(dtype))
        pipe(prompts[:2], seeds=[0, 1], sampler="ddim", steps=2, guidance=4.0)  # warm-up
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
        sync(ctx.device)
        start = time.perf_counter()
        pipe(prompts, seeds=list(range(count)), sampler="ddim", steps=steps, guidance=4.0)
        sync(ctx.device)
        wall = time.perf_counter() - start
        rows.append({"label": f"sampling, {str(dtype).removeprefix('torch.')} UNet, DDIM {steps} steps",
                     "batch": count, "step_s": wall / steps, "img_per_s": count / wall, **memory(ctx.device),
                     "note": "ms per sampler step (guided: two halves in one batch)"})
    return {"rows": rows}


def measure_checkpoint(ctx: Context) -> dict[str, Any]:
    """One optimizer step (so Adam's state exists), then the trainer's checkpoint save and load, timed."""
    cfg = trainer_config(ctx, 4 if ctx.tiny else 8, "run-checkpoint", "train.max_steps=1", "train.log_every=1")
    trainer, _ = run_trainer(ctx, cfg, 1)
    sync(ctx.device)
    start = time.perf_counter()
    trainer.save_checkpoint()
    sync(ctx.device)
    save_s = time.perf_counter() - start
    size = sum(f.stat().st_size for f in trainer.checkpointer.root.rglob("*") if f.is_file()) / 2**30
    start = time.perf_counter()
    trainer.checkpointer.load(trainer.engine, trainer.ema)
    sync(ctx.device)
    load_s = time.perf_counter() - start
    params = sum(p.numel() for p in trainer.engine.module.parameters()) / 1e6
    shutil.rmtree(cfg.run.output_dir, ignore_errors=True)
    row = {"label": f"checkpoint, {params:.0f}M parameters, ZeRO-2 bf16",
           "note": f"save {save_s:.1f} s, load {load_s:.1f} s, {size:.2f} GiB (loaded right after saving: page cache)"}
    return {"rows": [row], "params_m": params, "save_s": save_s, "load_s": load_s, "size_gib": size}


def measure_losses(ctx: Context) -> dict[str, Any]:
    """The same run (seed, data, noise, initial weights) in bf16 and in fp32 (TF32 matmuls, the fp32 default on CUDA):
    the relative difference of the loss at every step."""
    steps, batch = (3, 4) if ctx.tiny else (5, 16)
    losses = {}
    for precision in ("bf16", "fp32"):
        cfg = trainer_config(ctx, batch, f"run-{precision}", f"train.max_steps={steps}", "train.log_every=1",
                             precision=precision)
        trainer, logged = run_trainer(ctx, cfg, steps)
        losses[precision] = [logged[s]["train/loss"] for s in range(1, steps + 1)]
        del trainer
        free_memory()
    rel = [abs(b - f) / abs(f) for b, f in zip(losses["bf16"], losses["fp32"])]
    row = {"label": f"loss bf16 vs fp32, steps 1-{steps}", "batch": batch,
           "note": "relative difference " + ", ".join(f"{100 * r:.2g} %" for r in rel)}
    return {"rows": [row], **losses, "rel_diff": rel, "max_rel_diff": max(rel)}


MEASURE: dict[str, Callable[[Context], dict[str, Any]]] = {
    "peak": measure_peak,
    "unet-256": partial(measure_unet, level=0, models=("ours", "diffusers")),
    "trainer-zero2-256": partial(measure_trainer, zero_stage=2),
    "compiled-ours-256": partial(measure_unet, level=0, models=("ours",), compiled=True),
    "compiled-diffusers-256": partial(measure_unet, level=0, models=("diffusers",), compiled=True),
    "channels-last-256": partial(measure_unet, level=0, models=("ours",), channels_last=True),
    "unet-512": partial(measure_unet, level=1, models=("ours", "diffusers")),
    "transformers-512": measure_transformers,
    "trainer-zero3-256": partial(measure_trainer, zero_stage=3),
    "sampling-256": measure_sampling,
    "checkpoint": measure_checkpoint,
    "loss-bf16-fp32": measure_losses,
}


# --- the GPU tests as a part ---------------------------------------------------------------------------------------


def gpu_tests_command() -> list[str]:
    """Verbose (each test is named as it starts, so a stopped run says which one was running), unbuffered."""
    return [sys.executable, "-m", "pytest", "-v", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider", "-rs",
            "--durations=10"]


def running_test(log: str) -> str | None:
    """The last test a verbose pytest log names without a result: the one running when it stopped."""
    started = re.findall(r"^(tests/\S+::\S+)[ \t]*(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)?", log, re.M)
    return started[-1][0] if started and not started[-1][1] else None


def run_gpu_tests(limit_s: float, log: Path, work: Path) -> dict[str, Any]:
    record = run_process(gpu_tests_command(), limit_s, work / "tests.json", log=log, cwd=ROOT,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    text = log.read_text(errors="replace") if log.exists() else ""
    summary = re.findall(r"^=+ (.* in [\d.]+s.*?) =+$", text, re.M)
    notes = [record.get("note"), summary[-1] if summary else None]
    if record.get("status") == "failed" and running_test(text):
        notes.append(f"running: {running_test(text)}")
    return {**record, "note": "; ".join(n for n in notes if n) + f" ({log.name})"}


# --- the table ------------------------------------------------------------------------------------------------------


def cell(row: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    return format(row[key] * scale, fmt) if row.get(key) is not None else ""


def render(data: dict[str, Any]) -> str:
    """The results as a Markdown table (one line per measured row; skipped and failed parts say why)."""
    parts = data["parts"]
    peak = parts.get("peak", {})
    versions = {r["diffusers"] for r in parts.values() if r.get("diffusers")}
    lines = [f"GPU check benchmark on {peak.get('device', '(device not read yet)')}: torch {peak.get('torch', '?')}, "
             f"diffusers {', '.join(sorted(versions)) or '?'}; peak {cell(peak, 'peak_tflops', '.4g') or '?'} TFLOP/s "
             f"({peak.get('peak_kind', 'not measured')}){'; tiny CPU dry run' if data.get('tiny') else ''}; "
             f"budget {data.get('budget_s', 0):.0f} s, {data.get('elapsed_s', 0):.0f} s used", "",
             "| part | measured | status | batch | ms/step | img/s | TFLOP/s | MFU | peak GiB | notes |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|---|"]
    for name, record in parts.items():
        status = record["status"] + (f" ({record['wall_s']:.0f} s)" if "wall_s" in record else "")
        rows = record.get("rows") or [{}]
        for i, row in enumerate(rows):
            compile_note = f"compile {row['compile_s']:.0f} s" if row.get("compile_s") else None
            last = record.get("note") if i == len(rows) - 1 else None  # the part's own note (why skipped, failed)
            note = "; ".join(n for n in (compile_note, row.get("note"), last) if n)
            lines.append(f"| {name} | {row.get('label', record['what'])} | {status} | {row.get('batch', '')} | "
                         f"{cell(row, 'step_s', '.1f', 1e3)} | {cell(row, 'img_per_s', '.1f')} | "
                         f"{cell(row, 'tflops', '.4g')} | {cell(row, 'mfu', '.1%')} | {cell(row, 'peak_gib', '.1f')} | "
                         f"{note} |")
    unet, trainer = parts.get("unet-256", {}), parts.get("trainer-zero2-256", {})
    lines.append("")
    if unet.get("rows"):
        ours = unet["rows"][0]
        lines.append(f"{ours['label']}: MFU {ours['mfu']:.1%} (target >= {TARGETS['mfu']:.0%} on one H200)")
    if "speedup_vs_diffusers" in unet:
        lines.append(f"ours vs diffusers, eager: {unet['speedup_vs_diffusers']:.2f}x "
                     f"(target >= {TARGETS['speedup_vs_diffusers']}x)")
    for kind, ratio in parts.get("transformers-512", {}).get("speedup_vs_diffusers", {}).items():
        lines.append(f"{kind} ours vs diffusers at the published shape: {ratio:.2f}x")
    if trainer.get("rows"):
        row = trainer["rows"][0]
        memory = f", peak {row['peak_gib']:.1f} GiB allocated" if row.get("peak_gib") is not None else ""
        lines.append(f"{row['label']}: {row['img_per_s']:.1f} img/s (target >= {TARGETS['img_per_s']:.0f}){memory}")
    return "\n".join(lines) + "\n"


# --- the command line -------------------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the default without CUDA): the dry run")
    parser.add_argument("--parts", default=None, help=f"comma-separated, from: {', '.join(p.name for p in PARTS)}")
    parser.add_argument("--gpu-tests", default=None, metavar="LOG",
                        help="also run pytest -m gpu tests/gpu as a part (after the first measurements), output to LOG")
    parser.add_argument("--budget-s", type=float, default=330.0, help="time for all parts; one that cannot finish in "
                        "what is left is skipped")
    parser.add_argument("--json", default="gpu-check-out/bench_gpu.json",
                        help="the results (and the table beside it, .md)")
    parser.add_argument("--plan", action="store_true",
                        help="print the parts, their expected and longest times; run none")
    parser.add_argument("--batch", type=int, default=0, help="fixed UNet batch (default: fill the GPU)")
    parser.add_argument("--tokens", type=int, default=77)
    parser.add_argument("--steps", type=int, default=None, help="timed UNet steps per row (default 10; tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed UNet steps first (default 3; tiny 1)")
    parser.add_argument("--trainer-steps", type=int, default=None, help="trainer steps timed after as many warm-up "
                        "steps (default 10; tiny 2)")
    parser.add_argument("--trainer-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the trainer parts, e.g. train.compile=model (repeatable)")
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)  # the parts' shared folder
    parser.add_argument("--run-part", default=None, help=argparse.SUPPRESS)  # in a part's own process
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    tiny = args.tiny or not torch.cuda.is_available()
    args.steps = args.steps or (2 if tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    args.trainer_steps = max(2, args.trainer_steps or (2 if tiny else 10))
    return args


def selected(args: argparse.Namespace) -> list[Part]:
    """The parts asked for, in priority order; ValueError names an unknown one."""
    names = [n.strip() for n in args.parts.split(",") if n.strip()] if args.parts else [p.name for p in PARTS]
    unknown = sorted(set(names) - {p.name for p in PARTS})
    if unknown:
        raise ValueError(f"unknown part {', '.join(unknown)} (known: {', '.join(p.name for p in PARTS)})")
    return [p for p in PARTS if p.name in names and (p.name != TESTS or args.gpu_tests)]


def run_part(args: argparse.Namespace) -> int:
    """In a part's own process: measure, write the record to --result; a failure is recorded, not raised."""
    ctx = Context(args, Path(args.work), read_record(Path(args.json)))
    try:
        record = MEASURE[args.run_part](ctx)
    except Exception as error:  # KeyboardInterrupt (the runner stopping it) is not caught: its traceback is the news
        traceback.print_exc()
        record = {"status": "failed", "note": f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"}
    write_atomic(Path(args.result), json.dumps({**record, "pid": os.getpid()}, indent=2))
    return 1 if record.get("status") == "failed" else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    if args.run_part:
        return run_part(args)
    try:
        parts = selected(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    tiny = args.tiny or not torch.cuda.is_available()
    if args.plan:
        lines, total = plan(parts, args.budget_s)
        print("\n".join(lines))
        every = sum(p.expected_s for p in parts)
        print(f"expected {total:.0f} s for the parts within the budget ({every:.0f} s for all)")
        return 0
    json_path = Path(args.json).resolve()
    json_path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    work.mkdir(parents=True, exist_ok=True)
    results = Results(json_path, json_path.with_suffix(".md"), render, budget_s=args.budget_s, tiny=tiny)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

    def launch(part: Part, limit_s: float) -> dict[str, Any]:
        if part.name == TESTS:
            return run_gpu_tests(limit_s, Path(args.gpu_tests).resolve(), work)
        result = work / f"{part.name}.json"
        cmd = [sys.executable, "-m", "bench.bench_gpu", *argv, "--json", str(json_path), "--work", str(work),
               "--run-part", part.name, "--result", str(result)]
        return run_process(cmd, limit_s, result, env=env)

    try:
        ok = run_parts(parts, launch, results, args.budget_s, tiny)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(render(results.data))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
