"""Samplers and guidance on a trained model, scored by the evaluation protocol: FID/KID (with the real floor and 95 %
bootstrap intervals) and alignment (with its ceiling and chance) against the number of network evaluations, for the
fast solvers at 10 and 20 NFE against DDPM with 250 steps; and a guidance sweep.

    .venv/bin/python -m bench.bench_eval --model runs/emoji-ldm/export
    .venv/bin/python -m bench.bench_eval --model runs/emoji-ldm/export --samplers unipc,dpmpp_3m --nfe 10,20 \\
        --reference-steps 250 --guidance 1,2,4,6

Every point runs ldm-eval's code path (``ldm.eval.Evaluator`` + ``run_sweep``): the same prompts, seeds and real
sets. A solver's steps are chosen so its NFE is the asked one (heun_ode: steps = (NFE + 1) / 2). Writes
bench/results/eval.md / eval.json (the tables), eval_nfe.png (FID vs NFE per sampler, the reference drawn) and
eval_guidance.png (FID and alignment against the guidance scale).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ldm.assemble import build_evaluator, load_exported
from ldm.eval import SweepPoint, format_table, nfe, run_sweep
from ldm.report.plots import guidance_tradeoff, nfe_curves

SAMPLERS = ("unipc", "dpmpp_3m", "dpmpp_2m", "heun_ode", "ddim")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def steps_for(sampler: str, target: int) -> int:
    """The step count whose NFE is closest to ``target`` (not above it when possible)."""
    best = 1
    for steps in range(1, target + 1):
        if nfe(sampler, steps) <= target:
            best = steps
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/emoji-ldm/export")
    p.add_argument("--data", default=None, help="real images (default: the model's eval.data / data.train)")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--nfe", type=_ints, default=[10, 20], help="network evaluations per image of the NFE sweep")
    p.add_argument("--nfe-guidance", type=float, default=None, help="guidance of the NFE sweep (default: eval's)")
    p.add_argument("--reference-steps", type=int, default=250, help="DDPM steps of the reference")
    p.add_argument("--guidance", type=_floats, default=[1, 2, 4, 6], help="guidance scales of the CFG sweep")
    p.add_argument("--guidance-sampler", default=None, help="sampler of the CFG sweep (default: eval's)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe, cfg = load_exported(args.model)
    e = cfg.eval
    evaluator = build_evaluator(cfg, pipe.device, data=args.data, num_images=args.num_images)
    setup = time.time() - start
    guidance = e.guidance if args.nfe_guidance is None else args.nfe_guidance
    nfe_points = [SweepPoint(s, steps_for(s, n), guidance) for s in args.samplers.split(",") for n in args.nfe]
    reference = SweepPoint("ddpm", args.reference_steps, guidance)
    g_sampler = args.guidance_sampler or e.sampler
    guidance_points = [SweepPoint(g_sampler, e.steps, g) for g in args.guidance]
    points = list(dict.fromkeys([*nfe_points, reference, *guidance_points]))  # each setting evaluated once
    tick = time.time()
    rows = {SweepPoint(r["sampler"], r["steps"], r["guidance"]): r
            for r in run_sweep(evaluator, pipe, points, out=out / "eval_grids")}
    sweep_seconds = time.time() - tick
    nfe_rows, ref_row = [rows[q] for q in nfe_points], rows[reference]
    guidance_rows = [rows[q] for q in guidance_points]
    nfe_plot = nfe_curves(nfe_rows, out / "eval_nfe.png", reference=(f"DDPM {args.reference_steps} steps",
                                                                     ref_row["fid"]))
    guidance_plot = guidance_tradeoff(guidance_rows, out / "eval_guidance.png")
    header = (f"model {args.model}; {evaluator.num_images} generated images (the floor set's captions, seeds "
              f"{evaluator.seed}..{evaluator.seed + evaluator.num_images - 1}) vs {len(evaluator.reference)} real "
              f"reference images; torch threads {torch.get_num_threads()}; set-up {setup:.0f} s, {len(points)} "
              f"points {sweep_seconds:.0f} s")
    text = "\n".join([header, "", f"## FID vs NFE (guidance {guidance:g}) against DDPM {args.reference_steps} steps",
                      format_table([ref_row, *nfe_rows]), "", f"## Guidance ({g_sampler}, {e.steps} steps)",
                      format_table(guidance_rows)])
    print(text)
    (out / "eval.md").write_text(text + "\n")
    (out / "eval.json").write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                               "reference": ref_row, "nfe_sweep": nfe_rows,
                                               "guidance_sweep": guidance_rows, "setup_seconds": setup,
                                               "sweep_seconds": sweep_seconds}, indent=2, default=str))
    print(f"wrote {nfe_plot}, {guidance_plot}, {out / 'eval.md'}, {out / 'eval.json'}")


if __name__ == "__main__":
    main()
