#!/usr/bin/env bash
# Run ldm-train with N processes on this machine (torchrun, standalone rendezvous).
# CPU: gloo backend; GPU: one process per GPU (NCCL). Hyper-parameters stay in the config.
#
#   launch/local.sh [-n NPROC] [--dry-run] [ldm-train args...]
#   launch/local.sh -n 2 --config configs/ldm/emoji.yaml train.max_steps=100
set -euo pipefail

nproc=1
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--nproc) nproc="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
if ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: --nproc must be a positive integer, got '$nproc'" >&2
  exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
[[ -x "$python" ]] || python="$(command -v python3)"

cmd=("$python" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$nproc"
     -m ldm.cli.train "$@")
if [[ "$dry_run" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
