"""`ldm-shards`: build WebDataset shards, e.g. `ldm-shards emoji --out data/emoji --image-size 32`.

    ldm-shards folder --images photos/ --out data/photos --image-size 256            # sidecar <stem>.txt captions
    ldm-shards folder --images photos/ --captions captions.csv --out data/photos     # or a CSV / JSONL file
    ldm-shards reshard 'laion/{00000..00099}.tar' --out data/laion --samples-per-shard 5000 --image-size 256
    ldm-shards latents --data data/emoji --autoencoder runs/autoencoder --out data/emoji-latents --image-size 32
    ldm-shards text --config configs/ldm/emoji.yaml --data data/emoji-latents --out data/emoji-text   # + key=value
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.data.builders import BuildError, build_folder_shards, reshard
from ldm.data.emoji import EmojiDataError
from ldm.data.shards import build_emoji_shards


def _positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _size_or_keep(text: str) -> int | None:
    """argparse type: an image side >= 1, or 0 / none to keep every image's size."""
    if text.strip().lower() in ("0", "none"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer or none, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 1 (or 0 / none to keep the size), got {value}")
    return value or None


def _fraction(text: str) -> float:
    """argparse type: a float in [0, 1)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-command per dataset builder)."""
    parser = _Parser(prog="ldm-shards", description="Build WebDataset shards.")
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    emoji = sub.add_parser("emoji", help="Google + Twitter emoji (npm) captioned with emojibase labels")
    emoji.add_argument("--out", required=True, help="output folder (shards + index.json)")
    emoji.add_argument("--image-size", type=_positive, default=32, help="square side in pixels (default 32)")
    emoji.add_argument("--samples-per-shard", type=_positive, default=1000, help="default 1000")
    emoji.add_argument("--val-fraction", type=_fraction, default=0.05,
                       help="held-out fraction of emoji, split by code (default 0.05)")
    emoji.add_argument("--seed", type=int, default=0, help="seeds the split and the shard order")
    emoji.add_argument("--limit", type=_positive, default=None, help="keep only N emoji (quick tests)")
    emoji.add_argument("--cache", default=None, help="npm tarball cache (default $LDM_CACHE/npm or ~/.cache/ldm/npm)")
    emoji.add_argument("--styles", default="google,twitter", help="comma-separated: google,twitter")
    folder = sub.add_parser("folder", help="an image folder captioned by sidecar .txt files or a CSV / JSONL file")
    folder.add_argument("--images", required=True, help="image folder (searched recursively without --captions)")
    folder.add_argument("--captions", default=None,
                        help="CSV (with a header) or JSONL file of image path (relative to --images) and caption; "
                             "default: the sidecar <stem>.txt next to each image")
    folder.add_argument("--path-column", default=None, help="column / key of the image path (default: path, file "
                                                            "or image, whichever is present)")
    folder.add_argument("--caption-column", default=None, help="column / key of the caption (default: caption or text)")
    resh = sub.add_parser("reshard", help="re-shard img2dataset-style tars (key.jpg|png, key.txt, key.json)")
    resh.add_argument("inputs", nargs="+", metavar="INPUT",
                      help="folder of .tar files, brace/glob pattern, tar URLs (http(s)://, pipe:)")
    for p in (folder, resh):
        p.add_argument("--out", required=True, help="output folder (shards + index.json)")
        p.add_argument("--image-size", type=_size_or_keep, default=None,
                       help="resize + centre-crop to this square side; 0 or none keeps each size (default)")
        p.add_argument("--samples-per-shard", type=_positive, default=1000, help="default 1000")
        p.add_argument("--val-fraction", type=_fraction, default=0.05,
                       help="held-out fraction, by a stable hash of the path / key (default 0.05)")
        p.add_argument("--seed", type=int, default=0, help="salts the split hash; seeds the folder sample order")
    lat = sub.add_parser("latents", help="pre-encode image shards into latent shards with a frozen autoencoder")
    lat.add_argument("--data", required=True, help="image shards (folder with index.json)")
    lat.add_argument("--autoencoder", required=True, help="autoencoder folder (model.safetensors + config.json)")
    lat.add_argument("--out", required=True, help="output folder for the latent shards + index.json")
    lat.add_argument("--image-size", type=_positive, required=True, help="the image size the autoencoder expects")
    lat.add_argument("--batch-size", type=_positive, default=64)
    lat.add_argument("--samples-per-shard", type=_positive, default=1000)
    lat.add_argument("--caption", default="label", choices=("label", "label_tags"))
    text = sub.add_parser("text", help="cache each caption's text embeddings (the config's text encoder) in shards")
    text.add_argument("--config", required=True, help="LDM config: its text_encoder section is the encoder, its "
                                                     "data.caption / data.val_fraction / data.val_seed apply")
    text.add_argument("--data", default=None, help="image or latent shards (default: the config's data.latents, "
                                                   "else data.train)")
    text.add_argument("--out", required=True, help="output folder for the cache (shards + index.json + null condition)")
    text.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                      help="stored dtype of the embeddings (default float32)")
    text.add_argument("--batch-size", type=_positive, default=64, help="captions per encoder forward (default 64)")
    text.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. text_encoder.path=...")
    return parser


def encode_text(args: argparse.Namespace) -> int:
    """`ldm-shards text`: the cache carries the encoder's fingerprint (from its files) and its null condition."""
    from ldm.assemble import build_text_encoder, resolve_device, text_fingerprint
    from ldm.conditioning import null_condition
    from ldm.config import ConfigError, LDMConfig, load_config
    from ldm.data import resolve_shards
    from ldm.data.text_cache import encode_text_shards

    try:
        cfg = load_config(LDMConfig, args.config, args.overrides)
        data = args.data or cfg.data.latents or cfg.data.train
        resolve_shards(data, "train")
        fingerprint = text_fingerprint(cfg.text_encoder)
    except (ConfigError, ValueError) as exn:
        print(f"ldm-shards: error: {exn}", file=sys.stderr)
        return 2
    device = resolve_device("auto")
    try:
        encoder = build_text_encoder(cfg.text_encoder, device)
    except (OSError, ValueError) as exn:
        print(f"ldm-shards: error: text_encoder: {exn}", file=sys.stderr)
        return 2
    index = encode_text_shards(data, args.out, encoder, fingerprint=fingerprint,
                               null_cond=null_condition(encoder, cfg.text_encoder.null_condition), dtype=args.dtype,
                               batch_size=args.batch_size, caption=cfg.data.caption,
                               val_fraction=cfg.data.val_fraction, val_seed=cfg.data.val_seed)
    info = index["text"]
    print(f"wrote {args.out}/index.json  text {info.get('max_length')} x {info.get('dim')} {info['dtype']}"
          f"{' + pooled ' + str(info['pooled_dim']) if info.get('pooled_dim') else ''}  encoder {fingerprint[:12]}"
          f"  skipped {info['skipped']}")
    for split, entry in index["splits"].items():
        print(f"  {split:5s} {entry['total']:6d} samples in {len(entry['shards'])} shards")
    return 0


def encode_latents(args: argparse.Namespace) -> int:
    """`ldm-shards latents`: the cache is fingerprinted with the encoder's weights and config."""
    from autoencoder import load_pretrained
    from ldm.assemble import resolve_device
    from ldm.data.latents import encode_latent_shards, folder_hash

    device = resolve_device("auto")
    try:
        ae = load_pretrained(args.autoencoder, device=device)
        digest = folder_hash(args.autoencoder)
    except (FileNotFoundError, ValueError) as exn:
        print(f"ldm-shards: error: --autoencoder: {exn}", file=sys.stderr)
        return 2
    index = encode_latent_shards(args.data, args.out, lambda x: ae.encode(x.to(device)), encoder_hash=digest,
                                 image_size=args.image_size, batch_size=args.batch_size,
                                 samples_per_shard=args.samples_per_shard, caption=args.caption)
    print(f"wrote {args.out}/index.json  latents {index['latents'].get('latent_shape')}  encoder {digest[:12]}")
    for split, info in index["splits"].items():
        print(f"  {split:5s} {info['total']:6d} samples in {len(info['shards'])} shards")
    return 0


def build_dataset(args: argparse.Namespace) -> int:
    """`ldm-shards folder` / `ldm-shards reshard`: bad samples are skipped and counted, bad usage exits 2."""
    common = dict(image_size=args.image_size, samples_per_shard=args.samples_per_shard,
                  val_fraction=args.val_fraction, seed=args.seed, progress=True)
    try:
        if args.dataset == "folder":
            index = build_folder_shards(args.images, args.out, captions=args.captions, path_column=args.path_column,
                                        caption_column=args.caption_column, **common)
        else:
            index = reshard(args.inputs, args.out, **common)
    except BuildError as exn:
        print(f"ldm-shards: error: {exn}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/index.json  image_size={index['image_size'] or 'kept'}")
    for split, info in index["splits"].items():
        print(f"  {split:5s} {info['total']:6d} samples in {len(info['shards'])} shards")
    skipped = index["skipped"]
    print("skipped: " + (", ".join(f"{k}={v}" for k, v in skipped.items()) if skipped else "none"))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for usage errors, 1 when fetching the data fails)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with a one-line message on usage errors
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out: {args.out} exists and is not a folder")
    if args.dataset == "latents":
        return encode_latents(args)
    if args.dataset == "text":
        return encode_text(args)
    if args.dataset in ("folder", "reshard"):
        return build_dataset(args)
    styles = tuple(s.strip() for s in args.styles.split(",") if s.strip())
    bad = [s for s in styles if s not in ("google", "twitter")]
    if not styles or bad:
        parser.error(f"--styles: unknown style(s) {bad or args.styles!r}; choose from google,twitter")
    try:
        index = build_emoji_shards(args.out, image_size=args.image_size, samples_per_shard=args.samples_per_shard,
                                   val_fraction=args.val_fraction, seed=args.seed, cache_dir=args.cache,
                                   limit=args.limit, styles=styles, progress=True)
    except EmojiDataError as exn:
        print(f"ldm-shards: error: {exn}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}/index.json  image_size={index['image_size']}")
    for split, info in index["splits"].items():
        print(f"  {split:5s} {info['total']:6d} samples in {len(info['shards'])} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
