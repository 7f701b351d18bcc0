#!/usr/bin/env bash
# Run ldm-train on one node of a multi-node job with torchrun (static rendezvous). Start it once per
# node, each with its own --node-rank; node 0 must be the machine at --master-addr.
#
#   launch/torchrun.sh --nnodes N|MIN:MAX --node-rank R --master-addr ADDR --master-port PORT \
#                      [--nproc-per-node K] [--rdzv-id ID] [--max-restarts N] [--log-dir DIR] [--dry-run] \
#                      [--] [ldm-train args...]
#   launch/torchrun.sh --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500 \
#                      --nproc-per-node 8 --config configs/ldm/emoji.yaml
#
# Single node: --nnodes 1 (the default; then --node-rank is 0 and the address 127.0.0.1:29500 unless
# given). Global ranks on node R are R*K .. R*K+K-1; WORLD_SIZE = N*K. Arguments after the launcher
# options (or after --) go to ldm.cli.train unchanged; hyper-parameters stay in the config.
# --rdzv-id ID: c10d rendezvous at ADDR:PORT under that id (e.g. the SLURM job id) instead of the static
# one: nodes may start in any order and the agents agree on the node ranks (RANKS then says so).
# Elastic (with --rdzv-id): --nnodes MIN:MAX and --max-restarts N. When a node dies, the survivors' workers
# fail at their next collective (within the process group's timeout), torchrun restarts them (up to N times)
# on the nodes still there, and ldm-train resumes from checkpoints/latest on the new world size.
# --log-dir DIR: every rank's stdout/stderr also go to files under DIR/node<R>/ (torchrun's --tee 3:
# <run>/attempt_<k>/<local rank>/{stdout,stderr}.log), beside the console.
# --dry-run prints MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK, NPROC_PER_NODE, WORLD_SIZE and the
# exact command instead of running it. SIGUSR1 sent to this script (or to every process of a SLURM
# step) reaches the training processes: they checkpoint, rank 0 runs $LDM_REQUEUE_CMD, all exit 0
# (one rank's signal stops every rank). With LDM_LAUNCH_PIDFILE set, node 0 writes its pid there.
# PYTHON overrides the interpreter (default: .venv/bin/python).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

nnodes=1
node_rank=""
master_addr=""
master_port=""
nproc=1
rdzv_id=""
max_restarts=0
log_dir=""
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --*=*)
      opt="${1%%=*}"
      case "$opt" in
        --nnodes|--node-rank|--master-addr|--master-port|--nproc-per-node|--rdzv-id|--max-restarts|--log-dir)
          set -- "$opt" "${1#*=}" "${@:2}"; continue ;;
        *) break ;;
      esac ;;
    --nnodes) ldm_need_value "$@"; nnodes="$2"; shift 2 ;;
    --node-rank) ldm_need_value "$@"; node_rank="$2"; shift 2 ;;
    --master-addr) ldm_need_value "$@"; master_addr="$2"; shift 2 ;;
    --master-port) ldm_need_value "$@"; master_port="$2"; shift 2 ;;
    --nproc-per-node) ldm_need_value "$@"; nproc="$2"; shift 2 ;;
    --rdzv-id) ldm_need_value "$@"; rdzv_id="$2"; shift 2 ;;
    --max-restarts) ldm_need_value "$@"; max_restarts="$2"; shift 2 ;;
    --log-dir) ldm_need_value "$@"; log_dir="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) ldm_help "$0"; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

min_nodes="$nnodes"
if [[ "$nnodes" == *:* ]]; then # elastic: MIN:MAX
  min_nodes="${nnodes%%:*}"
  nnodes="${nnodes#*:}"
  ldm_check_int "--nnodes MIN" "$min_nodes" 1
  ldm_check_int "--nnodes MAX" "$nnodes" 1
  [[ "$min_nodes" -le "$nnodes" ]] || ldm_usage_error "--nnodes MIN:MAX needs MIN <= MAX, got $min_nodes:$nnodes"
fi
ldm_check_int --nnodes "$nnodes" 1
ldm_check_int --nproc-per-node "$nproc" 1
ldm_check_int --max-restarts "$max_restarts" 0
if [[ "$min_nodes" != "$nnodes" && -z "$rdzv_id" ]]; then
  ldm_usage_error "--nnodes $min_nodes:$nnodes (elastic) needs --rdzv-id (the c10d rendezvous)"
fi
if [[ "$nnodes" -gt 1 ]]; then
  [[ -n "$node_rank" ]] || ldm_usage_error "--node-rank is required with --nnodes $nnodes"
  [[ -n "$master_addr" ]] || ldm_usage_error "--master-addr is required with --nnodes $nnodes"
  [[ -n "$master_port" ]] || ldm_usage_error "--master-port is required with --nnodes $nnodes"
fi
node_rank="${node_rank:-0}"
master_addr="${master_addr:-127.0.0.1}"
master_port="${master_port:-29500}"
ldm_check_int --node-rank "$node_rank" 0
ldm_check_int --master-port "$master_port" 1
if [[ "$node_rank" -ge "$nnodes" ]]; then
  ldm_usage_error "--node-rank must be below --nnodes ($nnodes), got $node_rank"
fi
if [[ "$master_port" -gt 65535 ]]; then
  ldm_usage_error "--master-port must be at most 65535, got $master_port"
fi
[[ "$master_addr" =~ ^[^[:space:]]+$ ]] || ldm_usage_error "--master-addr must be a host name or address, got '$master_addr'"
[[ -z "$rdzv_id" || "$rdzv_id" =~ ^[A-Za-z0-9._-]+$ ]] || ldm_usage_error "--rdzv-id must be letters, digits, . _ -; got '$rdzv_id'"

world=$((nnodes * nproc))
first=$((node_rank * nproc))
python="$(ldm_python)"
ranks="$first-$((first + nproc - 1))"
nodes_arg="$nnodes"
if [[ "$min_nodes" != "$nnodes" ]]; then
  nodes_arg="$min_nodes:$nnodes"
  world="$((min_nodes * nproc))-$world"
fi
if [[ -n "$rdzv_id" ]]; then
  cmd=("$python" -m torch.distributed.run --nnodes "$nodes_arg" --nproc_per_node "$nproc" --rdzv_backend c10d
       --rdzv_endpoint "$master_addr:$master_port" --rdzv_id "$rdzv_id")
  ranks="$nproc of 0-$((nnodes * nproc - 1)), assigned at the c10d rendezvous $rdzv_id"
else
  cmd=("$python" -m torch.distributed.run --nnodes "$nnodes" --node_rank "$node_rank"
       --nproc_per_node "$nproc" --master_addr "$master_addr" --master_port "$master_port")
fi
[[ "$max_restarts" == 0 ]] || cmd+=(--max_restarts "$max_restarts")
[[ -z "$log_dir" ]] || cmd+=(--log_dir "$log_dir/node$node_rank" --tee 3)
cmd+=(-m ldm.cli.train "$@")
env_lines=("MASTER_ADDR=$master_addr" "MASTER_PORT=$master_port" "NNODES=$nodes_arg" "NODE_RANK=$node_rank"
           "NPROC_PER_NODE=$nproc" "WORLD_SIZE=$world" "RANKS=$ranks")
[[ -z "$log_dir" ]] || env_lines+=("LOG_DIR=$log_dir/node$node_rank")
if [[ "$dry_run" == 1 ]]; then
  ldm_print_env "${env_lines[@]}"
  ldm_print_cmd "${cmd[@]}"
  exit 0
fi
# the machine's name, not $HOSTNAME: srun passes on the submitting host's environment, HOSTNAME included
echo "[launch] node $node_rank/$nodes_arg on $(hostname 2>/dev/null || echo "this host"): ranks $ranks of $world," \
     "rendezvous $master_addr:$master_port${log_dir:+, per-rank logs in $log_dir/node$node_rank}" >&2
[[ -z "$log_dir" ]] || mkdir -p "$log_dir/node$node_rank"
if [[ -n "${LDM_LAUNCH_PIDFILE:-}" && "$node_rank" == 0 ]]; then
  # slurm.sbatch's batch shell (on this node) sends SIGUSR1 here rather than to every process of the step
  if echo "$$" 2>/dev/null >"$LDM_LAUNCH_PIDFILE"; then
    trap 'rm -f "$LDM_LAUNCH_PIDFILE"' EXIT
  else
    echo "[launch] cannot write $LDM_LAUNCH_PIDFILE: SIGUSR1 will come through srun" >&2
  fi
fi
ldm_supervise 1 "${cmd[@]}"
