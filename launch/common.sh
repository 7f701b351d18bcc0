# shellcheck shell=bash
# Helpers shared by the launch scripts. Sourced, never run: `source "$(dirname "$0")/common.sh"`.
# Everything here is launcher plumbing (paths, usage errors, dry-run printing, signal forwarding);
# hyper-parameters stay in the config and reach ldm.cli.train as pass-through arguments.

LDM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# One-line usage error, exit code 2 (the project's convention for bad arguments).
ldm_usage_error() {
  echo "error: $*" >&2
  exit 2
}

# ldm_check_int NAME VALUE MIN: VALUE must be an integer >= MIN (MIN is 0 or 1).
ldm_check_int() {
  local name="$1" value="$2" min="$3" pattern='^[1-9][0-9]*$'
  [[ "$min" == 0 ]] && pattern='^(0|[1-9][0-9]*)$'
  if ! [[ "$value" =~ $pattern ]]; then
    if [[ "$min" == 0 ]]; then
      ldm_usage_error "$name must be a non-negative integer, got '$value'"
    fi
    ldm_usage_error "$name must be a positive integer, got '$value'"
  fi
}

# ldm_need_value OPTION "$@": the option at $1 must be followed by a value.
ldm_need_value() {
  [[ $# -ge 2 ]] || ldm_usage_error "$1 needs a value"
}

# The interpreter: $PYTHON, else the project's .venv, else python3 on PATH.
ldm_python() {
  local python="${PYTHON:-$LDM_ROOT/.venv/bin/python}"
  if [[ ! -x "$python" ]] && ! command -v "$python" >/dev/null 2>&1; then
    python="$(command -v python3 || echo python3)"
  fi
  printf '%s\n' "$python"
}

# Print the lines of a script's header comment (from line 2 to the first line that is not a comment).
ldm_help() {
  awk 'NR == 1 { next } /^#+SBATCH/ { print; next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1"
}

# Dry-run output: KEY=VALUE lines, then the command, shell-quoted so it can be pasted.
ldm_print_env() {
  local kv
  for kv in "$@"; do
    printf '%s\n' "$kv"
  done
}
ldm_print_cmd() {
  local out
  printf -v out '%q ' "$@"
  printf '%s\n' "${out% }"
}

# The processes DEPTH levels below PID (1: its children), from /proc, with pgrep as a fallback.
ldm_descendants() {
  local depth="$2" level pid f kids
  local -a current=("$1") next
  for ((level = 0; level < depth; level++)); do
    next=()
    for pid in "${current[@]}"; do
      kids=""
      for f in /proc/"$pid"/task/*/children; do
        [[ -r "$f" ]] && kids+=" $(<"$f")"
      done
      if [[ -z "${kids// /}" ]] && command -v pgrep >/dev/null 2>&1; then
        kids="$(pgrep -P "$pid" || true)"
      fi
      # shellcheck disable=SC2206  # word splitting of the pid list is intended
      next+=($kids)
    done
    current=("${next[@]}")
  done
  printf '%s\n' "${current[@]}"
}

# Is PID one of these launch scripts (and not another process that reused a stale pid)?
ldm_is_launcher() {
  local cmdline
  [[ -r "/proc/$1/cmdline" ]] || return 1
  cmdline="$(tr '\0' ' ' <"/proc/$1/cmdline")"
  [[ "$cmdline" == *launch/torchrun.sh* || "$cmdline" == *launch/local.sh* ]]
}

_ldm_child=""
_ldm_signalled=0
_ldm_stopped_by="" # TERM, INT or HUP once one was forwarded
_ldm_usr1_depth=1
_ldm_usr1_pidfile=""
_ldm_usr1_command=()
ldm_usr1_command=() # set by a launch script after sourcing this file (see ldm_supervise)

_ldm_forward() {
  local sig="$1" pid target=""
  _ldm_signalled=1
  [[ -n "$_ldm_child" ]] || return 0
  if [[ "$sig" == USR1 ]]; then
    if [[ -n "$_ldm_usr1_pidfile" && -r "$_ldm_usr1_pidfile" ]] && read -r target <"$_ldm_usr1_pidfile" \
      && [[ "$target" =~ ^[1-9][0-9]*$ ]] && ldm_is_launcher "$target" && kill -s USR1 "$target" 2>/dev/null; then
      echo "[launch] SIGUSR1 sent to the node-0 launcher (pid $target)" >&2
      return 0
    fi
    if [[ "${#_ldm_usr1_command[@]}" -gt 0 ]]; then
      local status=0
      "${_ldm_usr1_command[@]}" </dev/null >&2 || status=$?
      if [[ "$status" == 0 ]]; then
        echo "[launch] SIGUSR1 sent to the training processes through: ${_ldm_usr1_command[*]:0:3} ..." >&2
      else
        echo "[launch] error: sending SIGUSR1 through ${_ldm_usr1_command[0]} failed (exit $status)" >&2
      fi
      return 0
    fi
    if [[ "$_ldm_usr1_depth" -gt 0 ]]; then
      local sent=0
      for pid in $(ldm_descendants "$_ldm_child" "$_ldm_usr1_depth"); do
        kill -s USR1 "$pid" 2>/dev/null && sent=$((sent + 1))
      done
      echo "[launch] SIGUSR1 forwarded to $sent training process(es): checkpoint, requeue, exit" >&2
      return 0
    fi
  fi
  _ldm_stopped_by="$sig"
  kill -s "$sig" "$_ldm_child" 2>/dev/null || true
}

# ldm_supervise DEPTH CMD...: run CMD as a child, forward signals to it, return its exit code.
#   SIGUSR1 (SLURM's pre-emption warning) goes to the training processes only: the processes DEPTH
#   levels below CMD (torchrun: 1, its workers; DeepSpeed's runner: 2, below deepspeed.launcher.launch),
#   which checkpoint, run $LDM_REQUEUE_CMD on rank 0 and exit 0, so the launcher exits 0 too. CMD and
#   everything it starts begin with USR1 ignored: its default action would kill a launcher when a
#   scheduler signals every process of a job step; the trainer installs its own handler. Their other
#   children (data pipes, requeue command) are not signalled. DEPTH 0: USR1 goes to CMD itself (srun,
#   which passes it on) unless the file named by the shell variable ldm_usr1_pidfile (not exported)
#   holds the pid of a live process, which then gets it instead.
#   With the array ldm_usr1_command set (not exported), USR1 runs that command instead (pdsh carrying
#   the signal to other hosts), and the report says whether it succeeded.
#   TERM, INT and HUP always go to CMD (torchrun, DeepSpeed and srun pass them on to their workers); when CMD
#   then exits non-zero (torchrun exits 1 when stopped), the return code is 128 + the signal (143 for TERM).
ldm_supervise() {
  _ldm_usr1_depth="$1"
  _ldm_usr1_pidfile="${ldm_usr1_pidfile:-}"
  _ldm_usr1_command=("${ldm_usr1_command[@]}")
  shift
  if [[ "$_ldm_usr1_depth" -gt 0 ]]; then
    trap '' USR1 # inherited by the child as "ignored"
  fi
  "$@" &
  _ldm_child=$!
  trap '_ldm_forward USR1' USR1
  trap '_ldm_forward TERM' TERM
  trap '_ldm_forward INT' INT
  trap '_ldm_forward HUP' HUP
  local rc=0 again
  wait "$_ldm_child" || rc=$?
  # a trapped signal makes `wait` return early (status > 128) while the child still runs: wait again,
  # until a wait that was not interrupted; 127 means the status was already collected above
  while [[ "$_ldm_signalled" == 1 ]]; do
    _ldm_signalled=0
    again=0
    wait "$_ldm_child" 2>/dev/null || again=$?
    [[ "$again" == 127 ]] && break
    rc="$again"
  done
  trap - USR1 TERM INT HUP
  if [[ -n "$_ldm_stopped_by" && "$rc" != 0 ]]; then
    # torchrun (or srun) exits 1 when it is stopped, whatever its workers did: say it was a stop, as 128 + signal
    rc=$((128 + $(kill -l "$_ldm_stopped_by")))
    echo "[launch] stopped by SIG$_ldm_stopped_by: exit $rc (the training processes checkpoint first: see their" \
      "output)" >&2
  fi
  return "$rc"
}
