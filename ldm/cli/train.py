"""ldm-train: train the text-conditioned latent diffusion UNet under DeepSpeed.

Single process:   ldm-train --config configs/ldm/emoji.yaml train.max_steps=200
N processes:      launch/local.sh -n N --config configs/ldm/emoji.yaml   (torchrun sets RANK etc.)
Several nodes:    launch/torchrun.sh, launch/deepspeed_hostfile.sh, sbatch launch/slurm.sbatch
Resumes automatically from <run.output_dir>/checkpoints/latest. On SIGUSR1 (SLURM's pre-emption warning) it
checkpoints at the next step, runs $LDM_REQUEUE_CMD (if set, e.g. `scontrol requeue $SLURM_JOB_ID`) and exits 0
(1 when that command fails); on SIGTERM (scancel) it checkpoints and exits 143 without requeueing.
"""

from __future__ import annotations

import argparse
import sys

from ldm.cli._common import add_config_args, load_or_exit, run_main
from ldm.config import LDMConfig

DEFAULT_CONFIG = "configs/ldm/emoji.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ldm-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, DEFAULT_CONFIG)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)
    return run_main(train, load_or_exit(LDMConfig, args))


def train(cfg: LDMConfig) -> int:
    """Train the run of ``cfg`` and say what it left; the exit code (1: diverged; a pre-empted run's code)."""
    from ldm.train.checkpoint import CheckpointWriteError
    from ldm.train.trainer import Trainer, TrainingDiverged

    try:
        result = Trainer(cfg).train()
    except TrainingDiverged as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        return 1
    except CheckpointWriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result["preempted"]:
        print(f"pre-empted: checkpoint of step {result['step']} written; the next start resumes from it")
        return result["exit_code"]
    elif result.get("grid"):
        print(f"sample grid: {result['grid']}")
        print(f"exported model: {result['export']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
