"""FID against NFE for each sampler, and the guidance-scale sweep, on a trained model (default: the demo model).

Every point runs ldm-eval's code path (``ldm.eval.Evaluator`` + ``run_sweep``): the same held-out prompts and seeds,
FID/KID against the whole held-out split, the subcategory probe. The reference is DDPM with --reference-steps
steps; the table reports, per sampler, the smallest NFE whose FID is within 10% of it.

    .venv/bin/python -m bench.bench_eval --model /tmp/fresh/runs/emoji-ldm/export --data /tmp/fresh/data/emoji \\
        --num-images 32 --steps 10,25,50 --reference-steps 1000 --guidance 0,1,2,4,8 --threads 1

Writes bench/results/eval_nfe.png (FID vs NFE per sampler, the reference and +10% drawn), eval_guidance.png (FID
and probe accuracy vs guidance), eval.json and eval.md (the tables), and a grid per point under eval_grids/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ldm.eval import Evaluator, SweepPoint, format_table, run_sweep
from ldm.assemble import load_exported
from ldm.report.plots import guidance_tradeoff, nfe_curves

SAMPLERS = ("ddpm", "ddim", "euler_maruyama", "pc", "heun_ode", "dpmpp_2m")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def within(rows: list[dict], reference: float, tolerance: float = 0.10) -> dict[str, int | None]:
    """Per sampler, the smallest NFE whose FID is at most (1 + tolerance) x the reference FID (None: never)."""
    out: dict[str, int | None] = {}
    for r in sorted(rows, key=lambda r: r["nfe"]):
        out.setdefault(r["sampler"], None)
        if out[r["sampler"]] is None and r["fid"] <= (1 + tolerance) * reference:
            out[r["sampler"]] = r["nfe"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="/tmp/fresh/runs/emoji-ldm/export")
    p.add_argument("--data", default="/tmp/fresh/data/emoji", help="held-out shards (val split) and probe training")
    p.add_argument("--num-images", type=int, default=32)
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--steps", type=_ints, default=[10, 25, 50], help="step grid of the NFE sweep")
    p.add_argument("--nfe-guidance", type=float, default=4.0, help="guidance scale of the NFE sweep")
    p.add_argument("--reference-steps", type=int, default=1000, help="DDPM steps of the reference FID")
    p.add_argument("--guidance", type=_floats, default=[0, 1, 2, 4, 8], help="guidance scales of the CFG sweep")
    p.add_argument("--guidance-sampler", default="ddpm")
    p.add_argument("--guidance-steps", type=int, default=25)
    p.add_argument("--probe-per-class", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 avoids oversubscription when other processes share the cores)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe, cfg = load_exported(args.model)
    evaluator = Evaluator(args.data, image_size=cfg.data.image_size, train_data=args.data,
                          caption=cfg.data.caption, num_images=args.num_images, batch_size=args.batch_size,
                          probe_per_class=args.probe_per_class, cache_dir=args.cache_dir)
    setup = time.time() - start
    samplers = args.samplers.split(",")
    nfe_points = [SweepPoint(s, n, args.nfe_guidance) for s in samplers for n in args.steps]
    nfe_points.append(SweepPoint("ddpm", args.reference_steps, args.nfe_guidance))
    guidance_points = [SweepPoint(args.guidance_sampler, args.guidance_steps, g) for g in args.guidance]
    points = list(dict.fromkeys(nfe_points + guidance_points))  # each setting evaluated once
    tick = time.time()
    rows = {SweepPoint(r["sampler"], r["steps"], r["guidance"]): r
            for r in run_sweep(evaluator, pipe, points, out=out / "eval_grids")}
    sweep_seconds = time.time() - tick

    nfe_rows = [rows[q] for q in nfe_points]
    guidance_rows = [rows[q] for q in guidance_points]
    reference = rows[nfe_points[-1]]["fid"]
    reached = within([r for r in nfe_rows if r["steps"] != args.reference_steps or r["sampler"] != "ddpm"], reference)
    reach_lines = []
    for sampler, n in reached.items():
        top = max(r["nfe"] for r in nfe_rows if r["sampler"] == sampler)
        reach_lines.append(f"{sampler}: NFE {n}" if n is not None else f"{sampler}: not within 10% up to NFE {top}")
    nfe_plot = nfe_curves(nfe_rows, out / "eval_nfe.png", reference=(f"DDPM {args.reference_steps} steps", reference))
    guidance_plot = guidance_tradeoff(guidance_rows, out / "eval_guidance.png")
    header = (f"model {args.model}; {args.num_images} images (held-out captions, seeds 0..{args.num_images - 1}) vs "
              f"{len(evaluator.reference)} held-out real images; torch threads {torch.get_num_threads()}; "
              f"set-up (reference + probe, cached after the first run) {setup:.0f} s, {len(points)} points "
              f"{sweep_seconds:.0f} s")
    text = "\n".join([header, "", f"FID vs NFE (guidance {args.nfe_guidance:g}); reference DDPM {args.reference_steps} "
                      f"steps FID {reference:.4g}", format_table(nfe_rows), "",
                      "smallest NFE within 10% of the reference FID:", *reach_lines, "",
                      f"guidance sweep ({args.guidance_sampler}, {args.guidance_steps} steps)",
                      format_table(guidance_rows)])
    print(text)
    (out / "eval.md").write_text(text + "\n")
    (out / "eval.json").write_text(json.dumps({"settings": vars(args), "reference_fid": reference,
                                               "nfe_within_10pct": reached, "nfe_sweep": nfe_rows,
                                               "guidance_sweep": guidance_rows, "setup_seconds": setup,
                                               "sweep_seconds": sweep_seconds}, indent=2, default=str))
    print(f"wrote {nfe_plot}, {guidance_plot}, {out / 'eval.md'}, {out / 'eval.json'}")


if __name__ == "__main__":
    main()
