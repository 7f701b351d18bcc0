#!/usr/bin/env bash
# The GPU check, as one script for one command on a machine with one GPU and no network: install the project's
# missing packages from carried wheels (bench/gpu_wheels.sh) over the machine's own torch, then run
# bench/bench_gpu.py, whose parts (the GPU tests among them) run in priority order, each in its own process,
# within what is left of the time budget; write one report.
#
#   bench/gpu_check.sh [--wheels DIR] [--out DIR] [--budget-s S] [--dry-run] [--plan]
#
# --wheels DIR: the wheel folder (default build/gpu-wheels); a wheel is installed only when its package is
#   not installed already (--no-deps --no-index), then `pip check` lists what is still missing. Its COMMIT
#   file (bench/gpu_wheels.sh writes it) names the commit when no .git came along.
# --out DIR: where gpu_report.md, bench_gpu.json, bench_gpu.md (the table) and the logs go (default $OUT,
#   else gpu-check-out); six files, no folders: everything comes back from a device command.
# --budget-s S: the whole check's time, 60 to 600 (default 560: one device command may run 600 s). Every step's
#   limit comes out of what is left of it, so the limits never add up to more.
# --dry-run: install nothing (say what would be installed). --plan: print the environment, the limits and
#   the expected device time; run nothing. Without CUDA (a CPU dry run) the benchmark runs every part with
#   tiny shapes and the gpu tests skip; the report is written all the same.
# PYTHON picks the interpreter (default: python3 on PATH). Exit code 0 when every step that ran passed.
set -euo pipefail

readonly INSTALL_LIMIT_S=150 INSTALL_EXPECTED_S=40 REPORT_RESERVE_S=15 STOP_GRACE_S=10

section() { printf '\n## %s\n\n' "$1" >>"$report"; }
fenced() { { echo '```'; cat; echo '```'; } >>"$report"; }

# log_tail FILE N: FILE's last N lines without progress-bar updates; succeeds for an empty or missing FILE
log_tail() {
  if [[ ! -s "$1" ]]; then
    echo "(${1##*/}: no output)"
    return 0
  fi
  { grep -v -E '(it/s|s/it)\]|^\s*$' "$1" || true; } | tail -n "$2"
}

# seconds left of the budget
left() { echo $((budget - (SECONDS - start))); }

# step NAME LIMIT_S CMD...: run with a time limit (SIGINT first: Python says where it was; SIGKILL 10 s later),
# output to $out/NAME.log; records the limit and the exit status, never fails itself
step() {
  local name="$1" limit="$2" rc=0 t0=$SECONDS
  shift 2
  if ((limit < 1)); then  # `timeout 0` would mean no limit at all
    failed+=("$name (not started: the budget is spent)")
    return 0
  fi
  limits+=(" $name by $((t0 - start + limit + STOP_GRACE_S)) s")
  timeout --signal=INT --kill-after="$STOP_GRACE_S" "$limit" "$@" >>"$out/$name.log" 2>&1 || rc=$?
  if [[ "$rc" != 0 ]]; then
    failed+=("$name (exit $rc$([[ "$rc" == 124 || "$rc" == 137 ]] && echo ", stopped at its ${limit} s"))")
  fi
  echo "[gpu_check] $name: exit $rc in $((SECONDS - t0)) s (limit $limit s)" >&2
  return 0
}

# the commit of this tree: git's, else the stamp in the wheel folder (no .git travels to the device)
commit_of() {
  local described
  if described="$(git describe --always --dirty --abbrev=12 2>/dev/null)"; then
    echo "$described"
  elif [[ -s "$wheels/COMMIT" ]]; then
    echo "$(head -n 1 "$wheels/COMMIT") (from $wheels/COMMIT)"
  else
    echo "unknown (no .git here and no $wheels/COMMIT: bench/gpu_wheels.sh --stamp-only $wheels writes it)"
  fi
}

# the environment of every step: DeepSpeed's accelerator as torch sees the machine; caches outside $out
set_environment() {
  local cuda
  cuda="$("$python" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)"
  if [[ "$cuda" == 1 ]]; then DS_ACCELERATOR=cuda; else DS_ACCELERATOR=cpu; fi
  TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${TMPDIR:-/tmp}/ldm-torch-extensions}"
  PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export DS_ACCELERATOR TORCH_EXTENSIONS_DIR PYTHONPATH HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
}

# the bench's budget: what is left after the install (expected, or spent) and the reserve for stopping and the report
bench_budget() { echo $(($1 - REPORT_RESERVE_S - STOP_GRACE_S)); }

# plan BEFORE_S: the parts that fit the budget when they start BEFORE_S into it (the machine's survey and the
# install, spent or expected), and the expected device time of the whole command
plan() {
  local before_s="$1" parts_s text expected
  parts_s="$(bench_budget "$((budget - before_s))")"
  text="$("$python" -m bench.bench_gpu --plan --budget-s "$parts_s" --gpu-tests "$out/gpu_tests.log")"
  expected="$(awk '/^expected/ { print $2 }' <<<"$text")"
  echo "commit $(commit_of)"
  echo "DS_ACCELERATOR=$DS_ACCELERATOR TORCH_EXTENSIONS_DIR=$TORCH_EXTENSIONS_DIR"
  echo "budget ${budget} s: install (limit ${INSTALL_LIMIT_S} s), then the parts (${parts_s} s from ${before_s} s on)"
  echo "$text"
  echo "expected device time on one H100/H200: ~$((before_s + expected)) s for this command" \
       "(survey and install ~${before_s} s, parts ~${expected} s), plus the machine's start (1-2 min)"
}

install_wheels() {
  local whl dist missing=()
  if [[ -d "$wheels" ]]; then
    for whl in "$wheels"/*.whl; do
      [[ -e "$whl" ]] || continue
      dist="$(basename "$whl" | cut -d- -f1)"
      if ! "$python" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null; then
        missing+=("$whl")
      fi
    done
    echo "wheels in $wheels: $(find "$wheels" -name '*.whl' | wc -l); not installed here: ${#missing[@]}" >>"$report"
  else
    echo "no wheel folder $wheels: nothing to install from" >>"$report"
  fi
  if [[ "${#missing[@]}" -eq 0 ]]; then
    :
  elif [[ "$dry_run" == 1 ]]; then
    printf -- '- would install %s\n' "${missing[@]##*/}" >>"$report"
  else
    step install "$(min "$INSTALL_LIMIT_S" "$(($(left) - REPORT_RESERVE_S))")" \
      "$python" -m pip install --no-deps --no-index --no-compile --disable-pip-version-check "${missing[@]}"
    printf -- '- installed %s\n' "${missing[@]##*/}" >>"$report"
  fi
  echo "the project runs from this tree (PYTHONPATH), not installed" >>"$report"
  { "$python" -m pip check 2>&1 || true; } | head -n 20 | fenced
}

min() { if (($1 < $2)); then echo "$1"; else echo "$2"; fi; }

main() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  wheels="build/gpu-wheels"
  out="${OUT:-gpu-check-out}"
  budget=560
  dry_run=0
  local only_plan=0
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --wheels|--out|--budget-s)
        [[ $# -ge 2 ]] || { echo "error: $1 needs a value" >&2; exit 2; }
        case "$1" in --wheels) wheels="$2" ;; --out) out="$2" ;; *) budget="$2" ;; esac
        shift 2 ;;
      --dry-run) dry_run=1; shift ;;
      --plan) only_plan=1; shift ;;
      -h|--help) awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; exit 0 ;;
      *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
  done
  if ! [[ "$budget" =~ ^[0-9]+$ ]] || ((budget < 60 || budget > 600)); then
    echo "error: --budget-s must be whole seconds from 60 to 600 (one device command's limit), not '$budget'" >&2
    exit 2
  fi
  python="${PYTHON:-$(command -v python3)}"
  start=$SECONDS
  failed=()
  limits=()
  mkdir -p "$out"
  set_environment
  if [[ "$only_plan" == 1 ]]; then
    report=/dev/null
    plan "$INSTALL_EXPECTED_S"
    exit 0
  fi
  report="$out/gpu_report.md"
  rm -f "$report" "$out"/bench_gpu.json "$out"/bench_gpu.md "$out"/{install,bench,gpu_tests}.log
  {
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "commit $(commit_of); dry run: $dry_run; budget ${budget} s"
  } >"$report"
  section "Machine"
  {
    "$python" - <<'EOF' || true
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}")
else:
    print("no CUDA device: a CPU dry run (gpu tests skip, the benchmark runs tiny)")
EOF
    if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; fi
    echo "CPU cores: $(getconf _NPROCESSORS_ONLN)"
    echo "DS_ACCELERATOR=$DS_ACCELERATOR TORCH_EXTENSIONS_DIR=$TORCH_EXTENSIONS_DIR"
  } 2>&1 | fenced

  section "Install"
  install_wheels

  section "Plan"
  # a dry run installed nothing, on another machine: the device's survey and install are expected, not spent
  if [[ "$dry_run" == 1 ]]; then before=$INSTALL_EXPECTED_S; else before=$((SECONDS - start)); fi
  plan "$before" 2>&1 | tee /dev/stderr | fenced

  local parts_s before
  parts_s="$(bench_budget "$(left)")"
  step bench "$((parts_s > 0 ? parts_s + STOP_GRACE_S : 0))" "$python" -m bench.bench_gpu --budget-s "$parts_s" \
    --gpu-tests "$out/gpu_tests.log" --json "$out/bench_gpu.json"

  section "GPU tests (pytest -m gpu tests/gpu, gpu_tests.log)"
  log_tail "$out/gpu_tests.log" 30 | fenced
  section "Benchmark (bench_gpu.md, bench_gpu.json)"
  if [[ -s "$out/bench_gpu.md" ]]; then cat "$out/bench_gpu.md" >>"$report"; fi
  echo "bench.log, last lines:" >>"$report"
  log_tail "$out/bench.log" 15 | fenced

  section "Summary"
  {
    local IFS=,
    echo "wall time: $((SECONDS - start)) s of the ${budget} s budget; steps end at the latest:${limits[*]:- none}"
    if [[ "${#failed[@]}" -eq 0 ]]; then
      echo "every step passed"
    else
      printf 'failed: %s\n' "${failed[@]}"
    fi
  } >>"$report"
  echo "[gpu_check] report: $report" >&2
  [[ "${#failed[@]}" -eq 0 ]]
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
