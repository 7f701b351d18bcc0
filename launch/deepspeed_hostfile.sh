#!/usr/bin/env bash
# Run ldm-train on the machines of an MPI-style hostfile with the DeepSpeed launcher.
#
#   launch/deepspeed_hostfile.sh HOSTFILE [--num-gpus K] [--num-nodes N] [--master-addr ADDR]
#       [--master-port PORT] [--launcher pdsh|openmpi|mvapich|mpich|impi|slurm] [--no-ssh-check]
#       [--node-rank R] [--dry-run] [--] [ldm-train args...]
#   launch/deepspeed_hostfile.sh hosts.txt --config configs/ldm/emoji.yaml
#
# HOSTFILE has one `HOST slots=K` line per machine (# comments and blank lines are skipped); K is the
# number of processes (GPUs) on that host. --num-nodes uses the first N hosts, --num-gpus caps the
# processes per host (on a CPU-only machine give it explicitly). MASTER_ADDR defaults to the first host
# and MASTER_PORT to 29500. By default the launcher reaches every host over passwordless ssh (pdsh) and
# runs on each `python -m deepspeed.launcher.launch` from the current folder, which must be on a shared
# file system; only MLFLOW*, PYTHON*, NCCL*-style variables are exported there, so put others (LDM_CACHE,
# TORCH_EXTENSIONS_DIR, ...) into ~/.deepspeed_env or ./.deepspeed_env as KEY=VALUE lines.
# --node-rank R runs this node only, without ssh (DeepSpeed's --no_ssh): start it once on every host.
# MPI launchers (openmpi, mvapich, mpich, impi) start every slot of every host in the hostfile: they refuse
# DeepSpeed's --num_nodes/--num_gpus (so do --num-nodes, --num-gpus, --node-rank here); the processes get
# MASTER_ADDR/MASTER_PORT from this script and their rank from the MPI (mapped by ldm.train.distributed).
# --launcher slurm runs `srun` inside an allocation (launch/ldm_train.py: DeepSpeed's srun command has no -m).
# SIGUSR1 to this script (pre-emption warning): reaches the training processes on this machine; in pdsh
# multi-node mode it is sent through pdsh to the workers on every host; with srun/mpirun it goes to them,
# which pass it on. The workers checkpoint, rank 0 runs $LDM_REQUEUE_CMD, all exit 0.
# --dry-run prints the environment of every node (NODE_RANK, host, processes, ranks, MASTER_ADDR,
# MASTER_PORT, NNODES, WORLD_SIZE) and the exact deepspeed command instead of running it.
# ldm.cli.train accepts (and ignores) the --local_rank argument that DeepSpeed adds.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

case "${1:-}" in
  -h|--help) ldm_help "$0"; exit 0 ;;
  ""|-*) ldm_usage_error "the first argument must be the hostfile (see --help)" ;;
esac
hostfile="$1"
shift
[[ -f "$hostfile" && -r "$hostfile" ]] || ldm_usage_error "hostfile '$hostfile' is not a readable file"

num_gpus=""
num_nodes=""
master_addr=""
master_port=29500
launcher=""
node_rank=""
ssh_check=1
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --*=*)
      opt="${1%%=*}"
      case "$opt" in
        --num-gpus|--num-nodes|--master-addr|--master-port|--launcher|--node-rank)
          set -- "$opt" "${1#*=}" "${@:2}"; continue ;;
        *) break ;;
      esac ;;
    --num-gpus) ldm_need_value "$@"; num_gpus="$2"; shift 2 ;;
    --num-nodes) ldm_need_value "$@"; num_nodes="$2"; shift 2 ;;
    --master-addr) ldm_need_value "$@"; master_addr="$2"; shift 2 ;;
    --master-port) ldm_need_value "$@"; master_port="$2"; shift 2 ;;
    --launcher) ldm_need_value "$@"; launcher="$2"; shift 2 ;;
    --node-rank) ldm_need_value "$@"; node_rank="$2"; shift 2 ;;
    --no-ssh-check) ssh_check=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) ldm_help "$0"; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

# the hostfile, parsed as DeepSpeed does (HOST slots=K; a host may appear once)
hosts=()
slots=()
lineno=0
while IFS= read -r line || [[ -n "$line" ]]; do
  lineno=$((lineno + 1))
  line="${line#"${line%%[![:space:]]*}"}"
  [[ -z "$line" || "$line" == \#* ]] && continue
  if [[ "$line" =~ ^([^[:space:]]+)[[:space:]]+slots=([0-9]+) ]]; then
    for h in "${hosts[@]}"; do
      [[ "$h" != "${BASH_REMATCH[1]}" ]] || ldm_usage_error "$hostfile:$lineno: host ${BASH_REMATCH[1]} is listed twice"
    done
    hosts+=("${BASH_REMATCH[1]}")
    slots+=("$((10#${BASH_REMATCH[2]}))")
  else
    ldm_usage_error "$hostfile:$lineno: expected 'HOST slots=N', got '$line'"
  fi
done <"$hostfile"
[[ "${#hosts[@]}" -gt 0 ]] || ldm_usage_error "hostfile '$hostfile' lists no host"

if [[ -n "$num_nodes" ]]; then
  ldm_check_int --num-nodes "$num_nodes" 1
  [[ "$num_nodes" -le "${#hosts[@]}" ]] || ldm_usage_error "--num-nodes $num_nodes but the hostfile lists ${#hosts[@]} hosts"
fi
nnodes="${num_nodes:-${#hosts[@]}}"
[[ -z "$num_gpus" ]] || ldm_check_int --num-gpus "$num_gpus" 1
ldm_check_int --master-port "$master_port" 1
[[ "$master_port" -le 65535 ]] || ldm_usage_error "--master-port must be at most 65535, got $master_port"
master_addr="${master_addr:-${hosts[0]}}"
launcher="${launcher,,}"
case "$launcher" in
  ""|pdsh|slurm) ;;
  openmpi|mvapich|mpich|impi)
    for given in "--num-nodes:$num_nodes" "--num-gpus:$num_gpus" "--node-rank:$node_rank"; do
      [[ -z "${given#*:}" ]] || ldm_usage_error "${given%%:*} does not work with --launcher $launcher (it starts" \
        "every slot of every host): write a hostfile with just the hosts and slots to use"
    done ;;
  *) ldm_usage_error "--launcher must be one of pdsh, openmpi, mvapich, mpich, impi, slurm; got '$launcher'" ;;
esac
if [[ -n "$node_rank" && -n "$launcher" && "$launcher" != pdsh ]]; then
  ldm_usage_error "--node-rank starts this node's processes itself: it does not work with --launcher $launcher"
fi
if [[ -n "$node_rank" ]]; then
  ldm_check_int --node-rank "$node_rank" 0
  [[ "$node_rank" -lt "$nnodes" ]] || ldm_usage_error "--node-rank must be below the node count ($nnodes), got $node_rank"
fi

# processes per node and global ranks, as the launcher will assign them
per_node=()
world=0
for ((i = 0; i < nnodes; i++)); do
  k="${slots[i]}"
  [[ -n "$num_gpus" && "$num_gpus" -lt "$k" ]] && k="$num_gpus"
  [[ "$k" -gt 0 ]] || ldm_usage_error "host ${hosts[i]} has no slot"
  per_node+=("$k")
  world=$((world + k))
done

python="$(ldm_python)"
cmd=("$python" -m deepspeed.launcher.runner --hostfile "$hostfile")
case "$launcher" in
  ""|pdsh) cmd+=(--num_nodes "$nnodes") ;;
  # the runner starts a one-host hostfile itself (no mpirun/srun) unless forced to use the launcher
  slurm) cmd+=(--num_nodes "$nnodes" --force_multi) ;;
  *) cmd+=(--force_multi) ;;
esac
cmd+=(--master_addr "$master_addr" --master_port "$master_port")
[[ -z "$num_gpus" ]] || cmd+=(--num_gpus "$num_gpus")
[[ -z "$launcher" ]] || cmd+=(--launcher "$launcher")
# the MPI processes learn the rendezvous from the environment (DeepSpeed exports it only for mpich/impi)
case "$launcher" in
  openmpi) cmd+=(--launcher_args "-x MASTER_ADDR=$master_addr -x MASTER_PORT=$master_port") ;;
  mvapich) cmd+=(--launcher_args "-env MASTER_ADDR=$master_addr -env MASTER_PORT=$master_port") ;;
esac
[[ -z "$node_rank" ]] || cmd+=(--no_ssh --node_rank "$node_rank")
[[ "$ssh_check" == 1 ]] || cmd+=(--no_ssh_check)
if [[ "$launcher" == slurm ]]; then
  cmd+=("$LDM_ROOT/launch/ldm_train.py" "$@") # DeepSpeed's srun command runs a file, never `python -m`
else
  cmd+=(--module ldm.cli.train "$@")
fi

# Where SIGUSR1 goes. Local (one host, or --node-rank): the workers, 2 levels below the runner (runner ->
# deepspeed.launcher.launch -> workers). pdsh over several hosts: the processes below the runner are pdsh
# and its ssh clients, so pdsh itself carries the signal to the children of this run's launcher on every
# host (found by its rendezvous address and port). srun/mpirun (1 level below the runner) pass it on.
usr1_depth=2
ldm_usr1_command=()
case "$launcher" in
  ""|pdsh)
    if [[ -z "$node_rank" && "$nnodes" -gt 1 ]]; then
      node_list="$(IFS=,; echo "${hosts[*]:0:nnodes}")"
      remote="for p in \$(pgrep -f -- '[d]eepspeed.launcher.launch .*--master_addr=$master_addr --master_port=$master_port'); do pkill -USR1 -P \"\$p\"; done"
      ldm_usr1_command=(pdsh -S -w "$node_list" "$remote")
    fi ;;
  *) usr1_depth=1 ;;
esac

if [[ "$dry_run" == 1 ]]; then
  ldm_print_env "MASTER_ADDR=$master_addr" "MASTER_PORT=$master_port" "NNODES=$nnodes" "WORLD_SIZE=$world"
  first=0
  for ((i = 0; i < nnodes; i++)); do
    if [[ -z "$node_rank" || "$node_rank" == "$i" ]]; then
      echo "# node $i: ${hosts[i]} NODE_RANK=$i NPROC_PER_NODE=${per_node[i]} RANKS=$first-$((first + per_node[i] - 1))"
    fi
    first=$((first + per_node[i]))
  done
  ldm_print_cmd "${cmd[@]}"
  if [[ "${#ldm_usr1_command[@]}" -gt 0 ]]; then
    echo "# on SIGUSR1: $(ldm_print_cmd "${ldm_usr1_command[@]}")"
  else
    echo "# on SIGUSR1: signal the processes $usr1_depth level(s) below the runner"
  fi
  exit 0
fi
[[ -z "$launcher" || "$launcher" == pdsh ]] || export MASTER_ADDR="$master_addr" MASTER_PORT="$master_port"
echo "[launch] deepspeed: $nnodes nodes, world size $world, rendezvous $master_addr:$master_port" >&2
# DeepSpeed's CPU shared-memory all-reduce leaves ~66 MB per local rank in /dev/shm: remove this job's
# buffers on this machine when the run ends (other hosts keep theirs unless started with --node-rank)
cleanup() {
  rm -f /dev/shm/deepspeed_allreduce_buffer_*_"${master_addr}_${master_port}"_* 2>/dev/null || true
}
trap cleanup EXIT
ldm_supervise "$usr1_depth" "${cmd[@]}"
