"""ldm-export: write the exported model folder (safetensors, raw + EMA) from any training checkpoint.

    ldm-export runs/emoji-ldm                       # latest checkpoint -> runs/emoji-ldm/export
    ldm-export runs/emoji-ldm --tag step00000500 --out exports/emoji-500
    ldm-export runs/emoji-ldm --ema-sigma-rel 0.08 --out exports/emoji-phema008   # post-hoc power EMA (EDM2)

Works whatever ZeRO stage and number of processes wrote the checkpoint (ZeRO partitions are consolidated). The
target may only be absent or a previous export (it has export.json): anything else is refused and left untouched.
With --ema-sigma-rel the export's EMA weights (unet_ema.safetensors, diffusers/unet) are the power EMA of that
relative width at the checkpoint's step, reconstructed from the run's power EMA snapshots (train.power_ema) by
EDM2's least-squares solve (Karras et al. 2024, Sec. 3.2); export.json records the width and the fit under "ema".
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ldm.cli._common import run_main, usage_error


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ldm-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the run's output_dir (holds config.yaml and checkpoints/)")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. step00000500 (default: latest)")
    p.add_argument("--out", default=None, help="output folder (default: <run_dir>/export); only a previous export "
                                               "is replaced")
    p.add_argument("--ema-sigma-rel", type=float, default=None, metavar="SIGMA_REL",
                   help="export the post-hoc power EMA of this relative width (e.g. 0.08; the run must have tracked "
                        "train.power_ema) instead of the EMA of train.ema_decay")
    args = p.parse_args(argv)
    if not (Path(args.run_dir) / "config.yaml").exists():
        usage_error(f"{args.run_dir} is not a training run folder (no config.yaml)")
    if args.ema_sigma_rel is not None:
        from ldm.train.power_ema import SIGMA_REL_MAX

        if not (math.isfinite(args.ema_sigma_rel) and 0 < args.ema_sigma_rel <= SIGMA_REL_MAX):
            usage_error(f"--ema-sigma-rel: a relative width in (0, {SIGMA_REL_MAX:.4f}], got {args.ema_sigma_rel}")
    return run_main(export, args)


def export(args: argparse.Namespace) -> None:
    """Export the checkpoint the arguments name; a missing checkpoint or snapshot is a usage error."""
    from ldm.train.export import export_checkpoint

    try:
        folder = export_checkpoint(args.run_dir, args.out, args.tag, args.ema_sigma_rel)
    except FileNotFoundError as e:
        usage_error(str(e))
    print(f"exported {folder}")


if __name__ == "__main__":
    raise SystemExit(main())
