#!/usr/bin/env bash
# The GPU check, as one script for a machine with one GPU and no network (<= 8 min on one H200): install the
# project's missing packages from carried wheels (bench/gpu_wheels.sh) over the machine's own torch, install
# the project with --no-deps, run the `gpu` tests and bench/bench_gpu.py, write one report file.
#
#   bench/gpu_check.sh [--wheels DIR] [--out DIR] [--dry-run]
#
# --wheels DIR: the wheel folder (default build/gpu-wheels); a wheel is installed only when its package is
#   not installed already (--no-deps --no-index), then `pip check` lists what is still missing.
# --out DIR: where the report (gpu_report.md), bench_gpu.json and the logs go (default $OUT, else
#   gpu-check-out). --dry-run: install nothing (say what would be installed). Without CUDA (a CPU dry run)
#   the gpu tests skip and the benchmark runs its tiny mode; the report is written all the same.
# PYTHON picks the interpreter (default: python3 on PATH). Exit code 0 when every step that ran passed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

wheels="build/gpu-wheels"
out="${OUT:-gpu-check-out}"
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels|--out)
      [[ $# -ge 2 ]] || { echo "error: $1 needs a value" >&2; exit 2; }
      if [[ "$1" == --wheels ]]; then wheels="$2"; else out="$2"; fi
      shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
python="${PYTHON:-$(command -v python3)}"
mkdir -p "$out"
report="$out/gpu_report.md"
start=$SECONDS
failed=()
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$out/torch_extensions}"

section() { printf '\n## %s\n\n' "$1" >>"$report"; }
fenced() { { echo '```'; cat; echo '```'; } >>"$report"; }
# step NAME TIMEOUT_S CMD...: run with a time limit, log to $out/NAME.log, keep the exit status
step() {
  local name="$1" limit="$2" rc=0 t0=$SECONDS
  shift 2
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1 || rc=$?
  [[ "$rc" == 0 ]] || failed+=("$name (exit $rc$([[ "$rc" == 124 || "$rc" == 137 ]] && echo ", over ${limit} s"))")
  echo "[gpu_check] $name: exit $rc in $((SECONDS - t0)) s" >&2
  return 0
}

{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); dry run: $dry_run"
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
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  echo "CPU cores: $(getconf _NPROCESSORS_ONLN)"
} 2>&1 | fenced

section "Install"
missing=()
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
if [[ "$dry_run" == 1 ]]; then
  printf -- '- would install %s\n' "${missing[@]##*/}" "the project (pip install --no-deps -e .)" >>"$report"
else
  if [[ "${#missing[@]}" -gt 0 ]]; then
    step install 300 "$python" -m pip install --no-deps --no-index "${missing[@]}"
  fi
  step install_project 120 "$python" -m pip install --no-deps --no-build-isolation -e .
  printf -- '- installed %s\n' "${missing[@]##*/}" >>"$report"
fi
"$python" -m pip check 2>&1 | head -20 | fenced || true

section "GPU tests (pytest -m gpu tests/gpu)"
step gpu_tests 240 "$python" -m pytest -q -m gpu tests/gpu -p no:cacheprovider -rs --durations=10
tail -n 25 "$out/gpu_tests.log" | fenced

section "Benchmark (bench/bench_gpu.py)"
step bench 235 "$python" -m bench.bench_gpu --budget-s 180 --json "$out/bench_gpu.json"
{ grep -v -E '(it/s|s/it)\]|^\s*$' "$out/bench.log" | tail -n 20; } | fenced

section "Summary"
{
  echo "wall time: $((SECONDS - start)) s"
  if [[ "${#failed[@]}" -eq 0 ]]; then
    echo "every step passed"
  else
    printf 'failed: %s\n' "${failed[@]}"
  fi
} >>"$report"
echo "[gpu_check] report: $report" >&2
[[ "${#failed[@]}" -eq 0 ]]
