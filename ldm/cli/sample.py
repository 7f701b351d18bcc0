"""ldm-sample: generate images from text prompts with a trained latent diffusion model.

Examples:
  ldm-sample --model runs/emoji-ldm/export --prompt "red apple" --prompt "grinning face"
  ldm-sample --model models:/emoji-ldm/1 --tracking-uri http://127.0.0.1:5000 --prompt "red apple"
  ldm-sample --model runs:/<run_id>/export --prompt "red apple"      # the run's exported model
  ldm-sample --model runs/emoji-ldm/export --prompts-file prompts.txt --sampler dpmpp_2m --steps 20 \\
             --guidance 5 --negative-prompt "sad" --images-per-prompt 8 --out samples/
  ldm-sample --model runs/emoji-ldm/export --prompt "red apple" --sampler edm_heun --spacing karras \\
             --guidance 4 --guidance-rescale 0.7 --guidance-interval 0.3 5

Image i uses seed (--seed + i), so any single image can be regenerated alone. Writes a grid (one row per
prompt) and one PNG per image whose text metadata records prompt, seed, sampler, steps and the guidance settings
(the model's configured guidance rescale, interval and time shift unless the flags set them).


Sizes: --width/--height (default: the trained image size; multiples of the autoencoder's downsampling). A model
with SDXL's micro-conditioning is also told --original-size and --target-size (HEIGHT WIDTH; default: the image
size) and --crop-top-left (TOP LEFT; default 0 0, an uncropped image), as SDXL's pipelines default them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.cli._common import (
    add_guidance_options, check_guidance, check_guidance_options, check_output_folder, load_model, resolve_device,
    run_main, usage_error,
)
from ldm.sampling import SAMPLERS


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ldm-sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="exported model folder (written at the end of ldm-train), a training run folder "
                        "(its latest checkpoint is exported first), runs:/<run_id>/export or "
                        "models:/<name>/<version> from MLflow")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI for runs:/ and models:/ (default: $MLFLOW_TRACKING_URI or runs/mlflow.db)")
    p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--negative-prompt", default="", help="used in place of the empty prompt for guidance")
    p.add_argument("--sampler", default="ddpm", choices=sorted(SAMPLERS), help="sampler (default: ddpm)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default: 50)")
    p.add_argument("--guidance", type=float, default=4.0,
                   help="classifier-free guidance scale: 0 unconditional, 1 conditional, >1 guided (default: 4)")
    add_guidance_options(p)
    p.add_argument("--spacing", default=None,
                   help="time grid: leading | trailing (discrete chains), uniform | logsnr | karras (EDM's rho = 7 "
                        "sigma grid) (default: the process's or the sampler's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.add_argument("--out", default="samples", help="output folder (default: samples/)")
    p.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda, cuda:N")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the trained size)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the trained size)")
    for flag, names, what in (("--original-size", ("HEIGHT", "WIDTH"), "original image size"),
                              ("--crop-top-left", ("TOP", "LEFT"), "crop corner"),
                              ("--target-size", ("HEIGHT", "WIDTH"), "target size")):
        p.add_argument(flag, type=int, nargs=2, metavar=names, default=None,
                       help=f"SDXL micro-conditioning: the {what} the model is told")
    args = p.parse_args(argv)
    if args.prompts_file:
        try:
            args.prompt += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        except OSError as e:
            usage_error(f"--prompts-file: {e}")
    if not args.prompt:
        usage_error("give at least one --prompt or a --prompts-file")
    if args.steps < 1 or args.images_per_prompt < 1 or args.batch_size < 1:
        usage_error("--steps, --images-per-prompt and --batch-size must be positive")
    for flag in ("width", "height"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            usage_error(f"--{flag} must be positive, got {getattr(args, flag)}")
    for flag in ("original_size", "target_size", "crop_top_left"):
        value = getattr(args, flag)
        if value is not None and (min(value) < 0 or (flag != "crop_top_left" and min(value) < 1)):
            usage_error(f"--{flag.replace('_', '-')}: expected {'non-negative' if 'crop' in flag else 'positive'} "
                        f"pixels, got {value}")
    check_guidance(args.guidance)
    args.guidance_options = check_guidance_options(args)
    check_output_folder(args.out)
    resolve_device(args.device)
    if not args.model.startswith(("runs:/", "models:/")) and not Path(args.model).is_dir():
        usage_error(f"--model: no such folder {args.model}")
    return args


def sample_size(pipe, args: argparse.Namespace) -> dict:
    """The size and micro-conditioning settings of a sampling call (usage errors name the flag)."""
    height, width = args.height or pipe.image_size[0], args.width or pipe.image_size[1]
    try:
        pipe.check_size(height, width)
    except ValueError as e:
        usage_error(f"--width/--height: {e}")
    size = {"height": height, "width": width}
    micro = {k: tuple(getattr(args, k)) for k in ("original_size", "crop_top_left", "target_size")
             if getattr(args, k) is not None}
    if micro and not pipe.micro_conditioned:
        usage_error(f"--{next(iter(micro)).replace('_', '-')}: this model has no size/crop micro-conditioning "
                    "(trained without model.addition_time_embed_dim)")
    if pipe.micro_conditioned:
        size.update(original_size=(height, width), crop_top_left=(0, 0), target_size=(height, width), **micro)
    return size


def main(argv: list[str] | None = None) -> int:
    return run_main(sample, parse(argv))


def sample(args: argparse.Namespace) -> None:
    """Load the model, check the size flags against it, and write the images and grid the arguments ask for."""
    from ldm.pipeline import write_samples

    pipe, cfg = load_model(args.model, args.device, args.tracking_uri, args.raw_weights,
                           [(args.sampler, args.spacing, args.steps)])
    size = sample_size(pipe, args)
    prompts = [p for p in args.prompt for _ in range(args.images_per_prompt)]
    seeds = [args.seed + i for i in range(len(prompts))]
    options = {**pipe.defaults, **args.guidance_options}  # what this sampling uses: the flags over the model's
    settings = dict(sampler=args.sampler, steps=args.steps, guidance=args.guidance, **options)
    record = {**settings, "spacing": args.spacing,
              "model": args.model if ":/" in args.model else str(Path(args.model).resolve()),
              "weights": "raw" if args.raw_weights else "ema", **size}
    grid = write_samples(pipe, prompts, seeds, args.out, record=record, nrow=args.images_per_prompt,
                         batch_size=args.batch_size, negative_prompt=args.negative_prompt, spacing=args.spacing,
                         **settings, **size)
    print(f"wrote {len(prompts)} images and {grid}")


if __name__ == "__main__":
    raise SystemExit(main())
