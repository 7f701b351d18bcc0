"""Shared command-line plumbing: config loading with overrides and exit code 2 for usage errors."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable

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


def run_main(fn: Callable[[], int | None]) -> int:
    """Run a CLI body: configure logging; a ConfigError or ValueError from bad input exits 2 with one line."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("deepspeed", "DeepSpeed", "torch.distributed", "alembic", "mlflow", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return fn() or 0
    except ConfigError as e:
        usage_error(f"config: {e}")
    return 0
