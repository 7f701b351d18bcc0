"""Benchmark: how much of the LDM's quality the stage-1 autoencoder leaves, at the evaluation protocol's counts.

The protocol's floor set (the 1,000 real images whose captions are the scored prompts) goes through the autoencoder
(encode to the posterior mode, decode), and the reconstructions are scored exactly as generated images are
(``ldm.eval``: FID and KID against the same 1,000-image reference set with bootstrap intervals, the alignment
classifier's accuracy). Beside them, the same protocol's real floor (the real images themselves: FID 30.6 on the
emoji data) and the classifier's ceiling on them. A model sampled through this decoder cannot be expected to do better
than the reconstructions; the gap between the two rows is the autoencoder's share of the LDM's distance to the floor.

    .venv/bin/python -m bench.bench_stage1 --autoencoder runs/autoencoder --data data/emoji \\
        --out bench/results/stage1.md

``--out`` appends the output and its provenance (bench/provenance.py) to a Markdown results file.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/ldm/emoji.yaml"
# what the figures depend on (a change to these after the results' commit makes them stale)
MEASURES = ["bench/bench_stage1.py", "autoencoder/model.py", "ldm/eval/evaluate.py", "ldm/eval/prepare.py",
            "ldm/eval/realset.py", "ldm/eval/inception.py", "ldm/eval/metrics.py", "ldm/eval/classifier.py"]


@torch.no_grad()
def reconstruct(model, images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] through the autoencoder (posterior mode), back in [0, 1]."""
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size] * 2 - 1  # (b, 3, H, W) in [-1, 1]
        out.append(((model.decode_raw(model.encode_dist(x).mode()) + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--autoencoder", default="runs/autoencoder")
    parser.add_argument("--data", default="data/emoji")
    parser.add_argument("--num-images", type=int, default=None, help="the protocol's count (default: the config's)")
    parser.add_argument("--out", default=None, help="append the output and its provenance to this Markdown file")
    args = parser.parse_args(argv)

    import autoencoder
    from autoencoder.metrics import psnr
    from bench.provenance import line, record
    from ldm.assemble import build_evaluator
    from ldm.config import LDMConfig, load_config
    from ldm.eval.evaluate import summary
    from ldm.eval.prepare import CLASSIFIER_POOL
    from ldm.eval.realset import read_split, split_pool

    prov = record(MEASURES)
    cfg = load_config(LDMConfig, CONFIG, [f"data.train={args.data}", f"autoencoder.path={args.autoencoder}"])
    e, d = cfg.eval, cfg.data
    n = args.num_images or e.num_images
    evaluator = build_evaluator(cfg, num_images=n)
    pool = read_split(args.data, "train", d.image_size, d.caption, e.classifier_label,  # the protocol's pool
                      limit=n + e.reference_images + (CLASSIFIER_POOL if e.classifier else 0))
    floor = pool.subset(split_pool(len(pool), n, e.reference_images, e.seed).floor)
    if floor.keys != evaluator.floor.keys:
        raise RuntimeError("the floor set read here is not the protocol's (keys differ)")
    model = autoencoder.load_pretrained(args.autoencoder).eval()
    real = floor.floats()  # (N, 3, H, W) in [0, 1]
    recon = reconstruct(model, real)
    metrics, _ = evaluator.score(recon)
    db = float(psnr(recon, real).mean())
    lines = [f"autoencoder {args.autoencoder}: {n} floor images of {args.data} at {d.image_size} px, "
             f"{model.latent_channels}-channel latents, factor {model.downsample_factor}",
             f"reconstructions: {summary(metrics)}",
             f"reconstructions: PSNR {db:.2f} dB (mean over the images); rFID / real floor "
             f"{metrics['fid'] / metrics['fid_floor']:.2f}x"]
    for text in lines:
        print(text, flush=True)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(f"\n### `{prov['command']}`\n\n<!-- {line(prov)} -->\n\n```\n" + "\n".join(lines) + "\n```\n")
    return {**metrics, "psnr": db}


if __name__ == "__main__":
    main()
