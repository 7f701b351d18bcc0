"""Benchmark: one training step of our DiT and MMDiT vs diffusers' PixArtTransformer2DModel / SD3Transformer2DModel
of identical configuration, and (for scale) our UNet's step at its emoji-cpu preset.

A step is forward + MSE loss + backward + AdamW step (torch's fused AdamW, as the trainer uses) at a preset (default
emoji-cpu: batch 32, 8x8x8 latents, 16 MiniLM-width tokens with padding masked as in training). Each pair holds the
same weights and runs in the same process on the same threads; repeats are interleaved (the order alternates) and
medians are compared, of wall-clock time and of process CPU time. diffusers' SD3 transformer takes no text mask, so
the MMDiT pair runs unmasked unless ``--mmdit-mask`` (ours then masks the padding, diffusers attends to it: not the
same arithmetic). Both compute the same operations, so with full-length captions the ratio is about 1 (dispatch
overhead aside); with ``--longest`` below ``--tokens`` (short captions, as emoji labels are) ours drops the text
positions no caption of the batch uses, which diffusers cannot. On a busy machine the ratios move by several percent
from run to run: repeat, prefer more repeats.

    .venv/bin/python -m bench.bench_transformers --repeats 20 --threads 2
    .venv/bin/python -m bench.bench_transformers --repeats 30 --threads 1 --out bench/results/transformers.md

``--out`` appends the run's output and its provenance (bench/provenance.py) to a Markdown results file.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from bench.bench_unet import train_step
from ldm.cli._common import retain_freed_memory
from ldm.models import DiT, MMDiT, UNet, model_preset

Step = tuple[Callable[[], torch.Tensor], torch.optim.Optimizer]
# what the step ratios depend on (a change to these after a run's commit makes its figures stale)
MEASURES = ["bench/bench_transformers.py", "bench/bench_unet.py", "ldm/models/dit.py", "ldm/models/mmdit.py",
            "ldm/models/attention.py", "ldm/models/embeddings.py", "ldm/models/presets.py"]


def make_inputs(batch: int, tokens: int, channels: int, side: int, dim: int, pooled: int, seed: int = 0,
                longest: int | None = None):
    """Latents, timesteps, a context padded to ``tokens`` with its mask (caption lengths uniform in 3..longest), a
    pooled vector and the target."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, (longest or tokens) + 1, (batch,), generator=g)  # caption lengths incl. special tokens
    return {
        "x": torch.randn(batch, channels, side, side, generator=g),  # (B, C, h, w)
        "t": torch.randint(0, 1000, (batch,), generator=g).float(),  # (B,)
        "context": torch.randn(batch, tokens, dim, generator=g),  # (B, L, D)
        "mask": torch.arange(tokens)[None, :] < lengths[:, None],  # (B, L) True = token
        "pooled": torch.randn(batch, pooled, generator=g),  # (B, P)
        "target": torch.randn(batch, channels, side, side, generator=g),  # (B, C, h, w)
    }


def pairs(kinds: list[str], preset: str, channels: int, inp: dict, mmdit_mask: bool, unet: bool) -> dict[str, Step]:
    """name -> (forward, optimizer): ours and diffusers' for each kind, the same weights in both."""
    import diffusers

    adam = {"lr": 1e-4, "fused": True}
    x, t, context, mask, pooled = inp["x"], inp["t"], inp["context"], inp["mask"], inp["pooled"]
    runs: dict[str, Step] = {}
    torch.manual_seed(0)
    if "dit" in kinds:
        ours = DiT(**model_preset("dit", preset, in_channels=channels, out_channels=channels)).train()
        ref = diffusers.PixArtTransformer2DModel(**ours.to_diffusers_config()).train()
        ours.load_state_dict(ref.state_dict())  # diffusers' random weights: every gradient non-zero
        runs["dit ours"] = (lambda: ours(x, t, context, mask), torch.optim.AdamW(ours.parameters(), **adam))
        runs["dit diffusers"] = (lambda: ref(x, context, timestep=t, encoder_attention_mask=mask).sample,
                                 torch.optim.AdamW(ref.parameters(), **adam))
    if "mmdit" in kinds:
        ours_m = MMDiT(**model_preset("mmdit", preset, in_channels=channels, out_channels=channels)).train()
        ref_m = diffusers.SD3Transformer2DModel(**ours_m.to_diffusers_config()).train()
        ours_m.load_state_dict(ref_m.state_dict())
        m = mask if mmdit_mask else None
        runs["mmdit ours"] = (lambda: ours_m(x, t, context, m, pooled=pooled),
                              torch.optim.AdamW(ours_m.parameters(), **adam))
        runs["mmdit diffusers"] = (lambda: ref_m(x, context, pooled, timestep=t).sample,
                                   torch.optim.AdamW(ref_m.parameters(), **adam))
    if unet:
        ours_u = UNet(**model_preset("unet", preset, in_channels=channels, out_channels=channels)).train()
        runs["unet ours"] = (lambda: ours_u(x, t, context, mask), torch.optim.AdamW(ours_u.parameters(), **adam))
    return runs


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the interleaved comparison; print medians, the speed ratios diffusers/ours and each max |difference|."""
    import diffusers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="dit,mmdit", help="comma-separated: dit, mmdit")
    parser.add_argument("--preset", default="emoji-cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16, help="text positions (the padded length)")
    parser.add_argument("--longest", type=int, default=0,
                        help="longest caption in tokens (default: --tokens); shorter batches let ours drop the padding")
    parser.add_argument("--channels", type=int, default=8, help="latent channels (the emoji autoencoder's 8)")
    parser.add_argument("--side", type=int, default=8, help="latent height and width")
    parser.add_argument("--mmdit-mask", action="store_true", help="ours masks the padding (diffusers cannot)")
    parser.add_argument("--no-unet", action="store_true", help="skip the UNet emoji-cpu step (scale reference)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=None, help="append the output and its provenance to this Markdown file")
    args = parser.parse_args(argv)
    retain_freed_memory()  # as every ldm-* command runs (fewer page faults for every model)
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench.provenance import line, record

    prov, lines = record(MEASURES), []

    def emit(text: str) -> None:
        lines.append(text)
        print(text, flush=True)

    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    dims = [model_preset(k, args.preset) for k in kinds]
    inp = make_inputs(args.batch, args.tokens, args.channels, args.side, dims[0].get("context_dim", 384),
                      next((d["pooled_dim"] for d in dims if "pooled_dim" in d), 384), longest=args.longest or None)
    unet = not args.no_unet and args.preset == "emoji-cpu"
    runs = pairs(kinds, args.preset, args.channels, inp, args.mmdit_mask, unet)
    with torch.no_grad():
        diffs = {k: (runs[f"{k} ours"][0]() - runs[f"{k} diffusers"][0]()).abs().max().item() for k in kinds}

    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.warmup + args.repeats):
        for name in (list(runs) if i % 2 == 0 else list(reversed(runs))):
            forward, opt = runs[name]
            start, start_cpu = time.perf_counter(), time.process_time()
            train_step(forward, inp["target"], opt)
            if i >= args.warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)

    emit(f"preset {args.preset}: batch {args.batch}, {args.side}x{args.side}x{args.channels} latents, {args.tokens} "
          f"tokens, captions of 3-{args.longest or args.tokens} (mask: dit yes, mmdit "
          f"{'ours only' if args.mmdit_mask else 'no'}); torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}, {torch.get_num_threads()} thread(s), fused AdamW, n={args.repeats}")
    med = {name: statistics.median(v) for name, v in wall.items()}
    med_cpu = {name: statistics.median(v) for name, v in cpu.items()}
    for name in runs:
        q = sorted(wall[name])
        emit(f"{name:>16}: median {med[name] * 1e3:7.1f} ms/step wall (min {q[0] * 1e3:.1f}, max {q[-1] * 1e3:.1f}), "
              f"{med_cpu[name] * 1e3:7.1f} ms/step CPU")
    result = {}
    for k in kinds:
        ours, ref = f"{k} ours", f"{k} diffusers"
        pair = statistics.median(d / o for d, o in zip(wall[ref], wall[ours]))
        fast = {n: statistics.quantiles(cpu[n], n=10)[0] for n in (ours, ref)}  # the least disturbed steps
        result[k] = med[ref] / med[ours]
        emit(f"{k}: speed-up diffusers/ours {result[k]:.3f}x wall (median of medians), {pair:.3f}x (median of "
              f"interleaved pairs), {med_cpu[ref] / med_cpu[ours]:.3f}x CPU time, {fast[ref] / fast[ours]:.3f}x "
              f"fastest-decile CPU time; max |ours - diffusers| forward {diffs[k]:.1e}")
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(f"\n### `{prov['command']}`\n\n<!-- {line(prov)} -->\n\n```\n" + "\n".join(lines) + "\n```\n")
    return result


if __name__ == "__main__":
    main()
