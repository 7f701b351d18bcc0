"""Shared command-line plumbing: config loading with overrides and exit code 2 for usage errors."""

from __future__ import annotations

import argparse
import ctypes
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from ldm.config import ConfigError, load_config

EXIT_USAGE = 2


def add_config_args(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument("--config", default=default, help=f"YAML config file (default: {default})")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.max_steps=200 data.batch_size=16")


def load_or_exit(cls: type, args: argparse.Namespace) -> Any:
    try:
        return load_config(cls, args.config, args.overrides)
    except ConfigError as e:
        usage_error(f"config: {e}")


def usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def retain_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of returning it to the OS after every tensor.

    By default glibc serves large blocks (from 128 KiB, adaptively up to 32 MiB) with mmap and unmaps them
    on free, and trims the heap top: every training step then faults its activations' pages in again. On
    the 2-core CPU the embedded default trains at 2.3-2.5 instead of 1.87 steps/s with this (1.07M -> 0.27M page faults
    in 60 steps), with the same losses. Users' MALLOC_*_ variables (or another allocator) take precedence.
    Returns whether the settings were applied.
    """
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt  # glibc only (not macOS, not musl)
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    return bool(mallopt(m_mmap_threshold, 256 << 20)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def run_main(command: Callable[..., int | None], *args: Any) -> int:
    """Run one command, ``command(*args)``, after configuring logging and malloc; its return value is the exit code
    (None: 0). A ConfigError, a bad weights file, export target or data set exits 2 with one line."""
    retain_freed_memory()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("deepspeed", "DeepSpeed", "torch.distributed", "alembic", "mlflow", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from ldm.data.skips import NoUsableData
    from ldm.export import ExportTargetError
    from ldm.io import WeightsError

    try:
        return command(*args) or 0
    except ConfigError as e:
        usage_error(f"config: {e}")
    except (WeightsError, ExportTargetError, NoUsableData) as e:  # bad input data or target, named in the message
        usage_error(str(e))
    return 0


def resolve_device(device: str, flag: str = "--device"):
    """The torch.device of ``--device`` (``ldm.assemble.resolve_device``); a usage error naming the flag otherwise."""
    from ldm.assemble import resolve_device as resolve

    try:
        return resolve(device)
    except ValueError as e:
        usage_error(f"{flag}: {e}")


def check_output_folder(path: str, flag: str = "--out") -> Path:
    """An output folder that is absent or a folder (a file there is a usage error, and is left untouched)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        usage_error(f"{flag}: {out} exists and is not a folder")
    return out


def check_guidance(value: float, flag: str = "--guidance") -> None:
    if not math.isfinite(value) or value < 0:
        usage_error(f"{flag}: must be a finite number >= 0, got {value}")


def add_guidance_options(parser: argparse.ArgumentParser) -> None:
    """--guidance-rescale, --guidance-interval LO HI and --time-shift; each defaults to the model's config."""
    parser.add_argument("--guidance-rescale", type=float, default=None, metavar="PHI",
                        help="CFG rescale phi in [0, 1] (Lin et al. 2023; 0: plain CFG, they use 0.7; default: the "
                             "model's sampling.guidance_rescale)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="guide only at noise levels LO < sigma <= HI, EDM's sigma = sigma_t / alpha_t, the "
                             "conditional model elsewhere (Kynkaanniemi et al. 2024; HI may be inf; default: the "
                             "model's sampling.guidance_interval, else everywhere)")
    parser.add_argument("--time-shift", type=float, default=None, metavar="S",
                        help="SD3's shift t' = s t / (1 + (s - 1) t) of the sampling grid (1: none; default: the "
                             "model's sampling.time_shift, else diffusion.time_shift)")


def check_guidance_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of ``add_guidance_options`` that were given, as pipeline keywords; a usage error naming the flag
    for a value out of range (checked before any model loads)."""
    rescale, interval, shift = args.guidance_rescale, args.guidance_interval, args.time_shift
    if rescale is not None and not 0 <= rescale <= 1:  # also refuses nan
        usage_error(f"--guidance-rescale: phi must be in [0, 1], got {rescale}")
    if interval is not None and not (0 <= interval[0] < interval[1] and not math.isnan(interval[1])):
        usage_error(f"--guidance-interval: expected LO HI with 0 <= LO < HI (EDM noise levels sigma / alpha), "
                    f"got {interval[0]} {interval[1]}")
    if shift is not None and not (math.isfinite(shift) and shift > 0):
        usage_error(f"--time-shift: must be a positive number, got {shift}")
    given = {"guidance_rescale": rescale, "guidance_interval": tuple(interval) if interval else None,
             "time_shift": shift}
    return {k: v for k, v in given.items() if v is not None}


def resolve_model(model: str, tracking_uri: str | None) -> Path:
    """A local folder for --model: MLflow runs:/ and models:/ URIs are downloaded (and cached) first."""
    if not model.startswith(("runs:/", "models:/")):
        path = Path(model)
        if not path.is_dir():
            usage_error(f"--model: no such folder {model}")
        return path
    from ldm.tracking import download_artifacts

    try:
        return download_artifacts(model, tracking_uri)
    except Exception as e:  # noqa: BLE001 - any lookup failure is a usage error naming the URI
        usage_error(f"--model: cannot fetch {model}: {str(e).splitlines()[0]}")


def model_config(folder: Path):
    """The LDM config of an exported model or of a training run folder (read before any weights load)."""
    from ldm.config import LDMConfig, load_config

    if not (folder / "config.yaml").is_file():
        usage_error(f"--model: {folder} is neither an exported model folder nor a training run (no config.yaml)")
    try:
        return load_config(LDMConfig, folder / "config.yaml")
    except ConfigError as e:
        usage_error(f"--model: {folder / 'config.yaml'}: {e}")


def check_sampling(cfg, sampler: str, steps: int, spacing: str | None = None) -> None:
    """The model of ``cfg`` can be sampled with these settings; a usage error naming the flag otherwise."""
    from ldm.assemble import check_sampler_settings

    if steps < 1:
        usage_error(f"--steps must be positive, got {steps}")
    try:
        check_sampler_settings(cfg, sampler, steps, spacing)
    except ValueError as e:
        flag = "--spacing" if spacing is not None and "spacing" in str(e) else "--steps" if "steps" in str(e) \
            else "--sampler"
        usage_error(f"{flag}: {e}")


def load_model(model: str, device: str, tracking_uri: str | None = None, raw_weights: bool = False,
               samplers: Iterable[tuple[str, str | None, int]] = ()):
    """(pipeline, config) for --model: an export, a training run folder (its latest checkpoint, read in memory:
    loading never writes), or a runs:/ / models:/ URI, on --device (auto: cuda if there is one). Every
    (sampler, spacing, steps) is checked against the model's config before any weights load."""
    folder = resolve_model(model, tracking_uri)
    cfg = model_config(folder)
    for sampler, spacing, steps in samplers:
        check_sampling(cfg, sampler, steps, spacing)
    dev = resolve_device(device)
    from ldm.assemble import from_weights, load_exported
    from ldm.io import load_tensors

    try:
        if (folder / "unet_ema.safetensors").is_file() or not (folder / "checkpoints").is_dir():
            return load_exported(folder, dev, use_ema=not raw_weights)
        from ldm.train.checkpoint import read_weights

        raw, ema, _ = read_weights(folder / "checkpoints")
        null = load_tensors(folder / "null_condition.safetensors")
        return from_weights(cfg, raw if raw_weights else ema, null, dev), cfg
    except (ValueError, FileNotFoundError) as e:
        usage_error(f"--model: {e}")
