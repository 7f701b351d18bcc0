#!/usr/bin/env bash
# Run ldm-train with N processes on this machine (torchrun, standalone rendezvous).
# CPU: gloo backend; GPU: one process per GPU (NCCL). Hyper-parameters stay in the config.
#
#   launch/local.sh [-n NPROC] [--dry-run] [--] [ldm-train args...]
#   launch/local.sh -n 2 --config configs/ldm/emoji.yaml train.max_steps=100
#
# --dry-run prints the environment and the exact command instead of running it. SIGUSR1 sent to this
# script reaches the training processes (checkpoint, $LDM_REQUEUE_CMD on rank 0, exit 0).
# Several machines: launch/torchrun.sh; SLURM: launch/slurm.sbatch; DeepSpeed hostfile:
# launch/deepspeed_hostfile.sh. PYTHON overrides the interpreter (default: .venv/bin/python).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

nproc=1
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--nproc) ldm_need_value "$@"; nproc="$2"; shift 2 ;;
    --nproc=*) nproc="${1#*=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) ldm_help "$0"; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
ldm_check_int --nproc "$nproc" 1

python="$(ldm_python)"
cmd=("$python" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$nproc"
     -m ldm.cli.train "$@")
if [[ "$dry_run" == 1 ]]; then
  ldm_print_env NNODES=1 NODE_RANK=0 "NPROC_PER_NODE=$nproc" "WORLD_SIZE=$nproc" \
    MASTER_ADDR=localhost "MASTER_PORT=auto (torchrun --standalone picks a free port)"
  ldm_print_cmd "${cmd[@]}"
  exit 0
fi
ldm_supervise 1 "${cmd[@]}"
