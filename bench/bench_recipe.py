"""Recipe study and the side-by-side against diffusers' recipe, at equal wall-clock on the same machine and data.

Every recipe is the emoji default (configs/ldm/emoji.yaml) with a few overrides. All train from the same cached
latents (``ldm-shards latents``, made here if missing) and the same captions, whose embeddings each process caches in
memory. A recipe's budget is wall-clock: its step time is calibrated first (median of steps 11-40 of a short run, on
a machine left alone), and it trains budget / step-time steps; the training itself may then run under any load
without changing its result. Every model is scored by the evaluation protocol (``ldm.eval``, the same prompts,
seeds, reference set and classifier), so the table's intervals and floors are the protocol's.

    .venv/bin/python -m bench.bench_recipe --budget-min 8                       # every recipe, then the table
    .venv/bin/python -m bench.bench_recipe --recipes default,v,lr-1e-3 --budget-min 4
    .venv/bin/python -m bench.bench_recipe --peer --curve default --budget-min 10   # time-to-quality vs diffusers

``--peer`` trains diffusers' recipe (``bench/diffusers_recipe.py``) for the same budget; ``--curve R`` evaluates
recipe R (and the peer) at 1/4, 1/2, 3/4 and all of the budget and prints how long R takes to reach the peer's
final FID, KID and alignment. Results are written per recipe under --out (a re-run reuses them) and as recipe.md,
recipe.json and recipe.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES: dict[str, list[str]] = {
    "default": [],
    "v": ["diffusion.prediction=v"],
    "min-snr": ["diffusion.weighting=min_snr"],
    "v+min-snr": ["diffusion.prediction=v", "diffusion.weighting=min_snr"],
    "logit-normal": ["diffusion.time_sampling=logit_normal"],
    "flow": ["diffusion.process=flow", "diffusion.prediction=velocity", "sampling.sampler=heun_ode",
             "eval.sampler=heun_ode", "eval.steps=10"],
    "lr-1e-3": ["train.lr=1.0e-3"],
    "lr-2.5e-4": ["train.lr=2.5e-4"],
    "warmup-500": ["train.warmup_steps=500"],
    "batch-64": ["data.batch_size=64"],
    "ema-0.999": ["train.ema_decay=0.999"],
    "ema-0.99": ["train.ema_decay=0.99"],
    "drop-0.2": ["diffusion.cond_dropout=0.2"],
    "wide": ["model.block_out_channels=[96,192]"],
    "deep": ["model.layers_per_block=2"],
}
CURVE_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
METRICS = ("fid", "kid", "class_acc")  # lower, lower, higher is better


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({proc.returncode}); see {log}")


def latent_cache(data: str, autoencoder: str, out: Path, image_size: int) -> Path:
    """The latent shards of data's train/val splits under the autoencoder (made once, checked every time)."""
    from ldm.data.latents import check_latent_cache, folder_hash

    folder = out / "latents"
    try:
        check_latent_cache(str(folder), folder_hash(autoencoder))
    except ValueError:
        run([sys.executable, "-m", "ldm.cli.shards", "latents", "--data", data, "--autoencoder", autoencoder,
             "--out", str(folder), "--image-size", str(image_size)], out / "latents.log")
    return folder


def base_overrides(args, latents: Path, name: str, run_dir: Path) -> list[str]:
    return [f"data.train={args.data}", f"data.val={args.data}", f"data.latents={latents}",
            f"autoencoder.path={args.autoencoder}", f"run.output_dir={run_dir}", f"run.name=recipe-{name}",
            f"tracking.uri={args.tracking_uri}", "tracking.experiment=recipe-study", "eval.every=0",
            "eval.final=false", "train.sample_every=0"]


def calibrate(overrides: list[str], steps: int = 40, skip: int = 10) -> float:
    """Mean seconds per optimizer step of the recipe (micro-steps + EMA), after ``skip`` warm-up steps."""
    from ldm.config import LDMConfig, load_config
    from ldm.train import Trainer

    cfg = load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml", [*overrides, "tracking.enabled=false"])
    trainer = Trainer(cfg)
    stream, times = trainer._batches(), []
    for step in range(steps):
        start = time.perf_counter()
        for _ in range(cfg.train.grad_accum):
            trainer.micro_step(next(stream))
        trainer.ema.update(step + 1)
        times.append(time.perf_counter() - start)
    return statistics.mean(times[skip:])


def evaluate(evaluator, pipe, cfg) -> dict[str, float]:
    e = cfg.eval
    return evaluator.evaluate(pipe, sampler=e.sampler, steps=e.steps, guidance=e.guidance).metrics


def train_recipe(name: str, args, latents: Path, evaluator) -> dict:
    """Calibrate, train for the budget, evaluate the final (and, for --curve recipes, earlier) checkpoints."""
    from ldm.assemble import from_weights
    from ldm.config import LDMConfig, load_config
    from ldm.io import load_tensors
    from ldm.train.checkpoint import read_weights, tag_for

    folder = args.out / name
    result_file = folder / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    run_dir = folder / "run"
    overrides = [*base_overrides(args, latents, name, run_dir), *RECIPES[name]]
    seconds = calibrate([*overrides, f"run.output_dir={folder / 'calibration'}"])
    steps = max(20, int(args.budget_min * 60 / seconds))
    curve = name in args.curve
    marks = sorted({max(1, round(f * steps)) for f in (CURVE_FRACTIONS if curve else (1.0,))})
    every = math.gcd(*marks) if len(marks) > 1 else steps
    start = time.time()
    run([sys.executable, "-m", "ldm.cli.train", "--config", str(ROOT / "configs/ldm/emoji.yaml"), *overrides,
         f"train.max_steps={steps}", f"train.ckpt_every={every}", f"train.keep_last={steps // every + 1}",
         f"train.val_every={marks[0]}"], folder / "train.log")
    wall = time.time() - start
    cfg = load_config(LDMConfig, run_dir / "config.yaml")
    null = load_tensors(run_dir / "null_condition.safetensors")
    points = []
    for step in marks:
        _, ema, _ = read_weights(run_dir / "checkpoints", tag_for(step))
        metrics = evaluate(evaluator, from_weights(cfg, ema, null, "cpu"), cfg)
        points.append({"step": step, "seconds": step * seconds, **metrics})
        print(f"{name} step {step}: {evaluator_summary(metrics)}", flush=True)
    result = {"name": name, "overrides": RECIPES[name], "seconds_per_step": seconds, "steps": steps,
              "budget_s": args.budget_min * 60, "train_wall_s": wall, "points": points, **points[-1]}
    result_file.write_text(json.dumps(result, indent=2))
    return result


def train_peer_recipe(args, latents: Path, evaluator) -> dict:
    """diffusers' recipe on the same latents and captions for the same budget (bench/diffusers_recipe.py)."""
    import torch

    from bench.diffusers_recipe import PeerRecipe, peer_denoiser, peer_unet, train_peer
    from ldm.assemble import assemble
    from ldm.config import LDMConfig, load_config
    from ldm.data import make_loader, resolve_shards

    result_file = args.out / "diffusers" / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    result_file.parent.mkdir(parents=True, exist_ok=True)
    cfg = load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml",
                      base_overrides(args, latents, "diffusers", args.out / "diffusers" / "run"))
    parts = assemble(cfg, "cpu")
    torch.manual_seed(cfg.run.seed)
    unet = peer_unet(parts.unet())

    def batches():
        for epoch in range(10**6):
            for batch in make_loader(resolve_shards(str(latents), "train"), batch_size=cfg.data.batch_size,
                                     image_size=cfg.data.image_size, seed=cfg.run.seed, epoch=epoch,
                                     shuffle_buffer=cfg.data.shuffle_buffer, latents=True):
                yield batch["latent"], parts.text_encoder(batch["caption"])

    warm = {}  # calibrate the way ours is: the recipe's own steps, the mean of steps 11-40
    _, total = train_peer(peer_unet(parts.unet()), batches(), parts.null_cond, 40, PeerRecipe(),
                          lambda step, elapsed, _: warm.setdefault("s", elapsed), (10,), progress=False)
    seconds = (total - warm["s"]) / 30
    steps = max(20, int(args.budget_min * 60 / seconds))
    marks = sorted({max(1, round(f * steps)) for f in CURVE_FRACTIONS}) if args.curve else [steps]
    points = []

    def on_checkpoint(step: int, elapsed: float, ema_unet) -> None:
        pipe = parts.pipeline(ema_unet)
        pipe.denoiser = peer_denoiser(ema_unet)
        metrics = evaluate(evaluator, pipe, cfg)
        points.append({"step": step, "seconds": step * seconds, "elapsed": elapsed, **metrics})
        print(f"diffusers step {step}: {evaluator_summary(metrics)}", flush=True)

    train_peer(unet, batches(), parts.null_cond, steps, PeerRecipe(), on_checkpoint, tuple(marks))
    result = {"name": "diffusers", "overrides": ["diffusers UNet2DConditionModel, DDPMScheduler, AdamW lr 1e-4 "
                                                 "constant + 500 warm-up, EMAModel 0.9999"],
              "seconds_per_step": seconds, "steps": steps, "budget_s": args.budget_min * 60, "points": points,
              **points[-1]}
    result_file.write_text(json.dumps(result, indent=2))
    return result


def evaluator_summary(metrics: dict) -> str:
    from ldm.eval import summary

    return summary(metrics)


def time_to_reach(points: list[dict], target: float, metric: str) -> float | None:
    """Seconds of training at which a curve first reaches ``target`` (linear between evaluations); None: never."""
    better = (lambda v: v >= target) if metric == "class_acc" else (lambda v: v <= target)
    previous = None
    for p in points:
        if better(p[metric]):
            if previous is None:
                return p["seconds"]
            t0, v0, t1, v1 = previous["seconds"], previous[metric], p["seconds"], p[metric]
            return t0 + (t1 - t0) * (target - v0) / (v1 - v0) if v1 != v0 else t1
        previous = p
    return None


def table(rows: list[dict]) -> str:
    from ldm.eval.sweep import cell as _cell

    head = ["recipe", "overrides", "s/step", "steps", "FID [95 %]", "KID x1e3 [95 %]", "alignment % [95 %]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["name"], ", ".join(r["overrides"]) or "(configs/ldm/emoji.yaml)",
                                        f"{r['seconds_per_step']:.3f}", str(r["steps"]), _cell(r, "fid"),
                                        _cell(r, "kid"), _cell(r, "class_acc")]) + " |")
    f = rows[0]
    lines.append(f"\nReal floor at the same counts: FID {_cell(f, 'fid_floor')}, KID x1e3 {_cell(f, 'kid_floor')}; "
                 f"alignment ceiling {100 * f.get('class_acc_real', float('nan')):.1f} %, chance "
                 f"{100 * f.get('class_chance', float('nan')):.1f} %; {int(f['num_images'])} generated images.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/emoji")
    p.add_argument("--autoencoder", default="runs/autoencoder")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, from {', '.join(RECIPES)}")
    p.add_argument("--budget-min", type=float, default=8.0, help="training wall-clock per recipe, minutes")
    p.add_argument("--peer", action="store_true", help="also train diffusers' recipe for the same budget")
    p.add_argument("--curve", default="", help="recipes evaluated at 1/4, 1/2, 3/4 of the budget too (with --peer)")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/recipe")
    p.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'runs/mlflow.db'}")
    args = p.parse_args()
    args.curve = [c for c in args.curve.split(",") if c]
    names = [n for n in args.recipes.split(",") if n]
    unknown = [n for n in names + args.curve if n not in RECIPES]
    if unknown:
        p.error(f"unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    args.out.mkdir(parents=True, exist_ok=True)

    from ldm.assemble import build_evaluator
    from ldm.config import LDMConfig, load_config
    from ldm.report.plots import eval_points

    cfg = load_config(LDMConfig, ROOT / "configs/ldm/emoji.yaml", [f"data.train={args.data}"])
    latents = latent_cache(args.data, args.autoencoder, args.out, cfg.data.image_size)
    evaluator = build_evaluator(cfg, "cpu", num_images=args.num_images)
    rows = [train_recipe(n, args, latents, evaluator) for n in names]
    if args.peer:
        rows.append(train_peer_recipe(args, latents, evaluator))
    (args.out / "recipe.json").write_text(json.dumps(rows, indent=2))
    text = table(rows)
    eval_points(rows, args.out / "recipe.png", labels=[r["name"] for r in rows])
    if args.peer and args.curve:
        peer = rows[-1]
        lines = ["", "| recipe | metric | diffusers final | reached by ours at | fraction of diffusers' wall-clock |",
                 "|---|---|---|---|---|"]
        for r in rows[:-1]:
            if r["name"] not in args.curve:
                continue
            for metric in METRICS:
                t = time_to_reach(r["points"], peer[metric], metric)
                frac = f"{t / peer['budget_s']:.2f}" if t is not None else "not reached"
                reached = f"{t / 60:.1f} min" if t is not None else "-"
                lines.append(f"| {r['name']} | {metric} | {peer[metric]:.4g} | {reached} | {frac} |")
        text += "\n".join(lines)
    (args.out / "recipe.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
