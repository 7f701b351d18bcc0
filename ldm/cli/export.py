"""ldm-export: write the exported model folder (safetensors, raw + EMA) from any training checkpoint.

    ldm-export runs/emoji-ldm                       # latest checkpoint -> runs/emoji-ldm/export
    ldm-export runs/emoji-ldm --tag step00000500 --out exports/emoji-500

Works whatever ZeRO stage and number of processes wrote the checkpoint (ZeRO partitions are consolidated). The
target may only be absent or a previous export (it has export.json): anything else is refused and left untouched.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.cli._common import run_main, usage_error


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ldm-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the run's output_dir (holds config.yaml and checkpoints/)")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. step00000500 (default: latest)")
    p.add_argument("--out", default=None, help="output folder (default: <run_dir>/export); only a previous export "
                                               "is replaced")
    args = p.parse_args(argv)
    if not (Path(args.run_dir) / "config.yaml").exists():
        usage_error(f"{args.run_dir} is not a training run folder (no config.yaml)")

    def body() -> int:
        from ldm.train.export import export_checkpoint

        try:
            folder = export_checkpoint(args.run_dir, args.out, args.tag)
        except FileNotFoundError as e:
            usage_error(str(e))
        print(f"exported {folder}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
