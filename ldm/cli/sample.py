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
"""

from __future__ import annotations

import argparse
import json
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
    check_guidance(args.guidance)
    args.guidance_options = check_guidance_options(args)
    check_output_folder(args.out)
    resolve_device(args.device)
    if not args.model.startswith(("runs:/", "models:/")) and not Path(args.model).is_dir():
        usage_error(f"--model: no such folder {args.model}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)

    def body() -> int:
        from PIL.PngImagePlugin import PngInfo

        from ldm.pipeline import make_grid, to_pil

        pipe, cfg = load_model(args.model, args.device, args.tracking_uri, args.raw_weights,
                               [(args.sampler, args.spacing, args.steps)])
        prompts = [p for p in args.prompt for _ in range(args.images_per_prompt)]
        seeds = [args.seed + i for i in range(len(prompts))]
        options = {**pipe.defaults, **args.guidance_options}  # what this sampling uses: the flags over the model's
        images = pipe.generate(prompts, seeds, batch_size=args.batch_size, negative_prompt=args.negative_prompt,
                               sampler=args.sampler, steps=args.steps, guidance=args.guidance, spacing=args.spacing,
                               **options)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(to_pil(images)):
            info = PngInfo()
            meta = {"prompt": prompts[i], "negative_prompt": args.negative_prompt, "seed": seeds[i],
                    "sampler": args.sampler, "steps": args.steps, "guidance": args.guidance, **options,
                    "spacing": args.spacing,
                    "model": args.model if ":/" in args.model else str(Path(args.model).resolve()),
                    "weights": "raw" if args.raw_weights else "ema"}
            for k, v in meta.items():
                info.add_text(k, str(v))
            info.add_text("parameters", json.dumps(meta))
            im.save(out / f"{i:05d}.png", pnginfo=info)
        make_grid(images, nrow=args.images_per_prompt, scale=2).save(out / "grid.png")
        print(f"wrote {len(prompts)} images and {out / 'grid.png'}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
