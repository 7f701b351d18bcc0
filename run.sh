#!/usr/bin/env bash
# One entry point that sets everything up on a fresh machine (Python 3.11 + pip, npm) and then runs:
#   ./run.sh demo [key=value ...]   the whole pipeline on the embedded emoji default (each stage's time printed)
#   ./run.sh test [pytest args]     the test suite (what CI runs: -m "not cluster", then -m cluster; the GPU tests
#                                   that can run on a CPU included); with arguments, pytest with them
# The virtual environment (.venv) is (re)installed only when pyproject.toml, the lock (constraints.txt:
# the exact versions tested) or the extras change. LDM_EXTRAS picks the extras (default "test"; "" for
# none, as the Docker image does); LDM_CONSTRAINTS another lock file ("" for none: pyproject's ranges).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

venv="${LDM_VENV:-.venv}"
python_bin="${PYTHON_BIN:-$(command -v python3.11 || command -v python3)}"

setup() {
  if [[ ! -x "$venv/bin/python" ]]; then
    echo "[setup] creating $venv with $python_bin"
    "$python_bin" -m venv "$venv"
  fi
  local stamp extras="${LDM_EXTRAS-test}" constraints="${LDM_CONSTRAINTS-constraints.txt}" target=.
  local -a pin=()
  [[ -z "$extras" ]] || target=".[$extras]"
  if [[ -n "$constraints" ]]; then
    [[ -f "$constraints" ]] || { echo "error: constraints file '$constraints' not found" >&2; exit 2; }
    pin=(--constraint "$constraints")
  fi
  stamp="$( { cat pyproject.toml; [[ -z "$constraints" ]] || cat "$constraints"; echo "extras=$extras"; } \
    | sha256sum | cut -d' ' -f1)"
  if [[ "$(cat "$venv/.installed" 2>/dev/null)" != "$stamp" ]]; then
    echo "[setup] installing the project and its dependencies (a few minutes the first time)"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet "${pin[@]}" -e "$target"
    echo "$stamp" > "$venv/.installed"
  fi
  if [[ "$cmd" == test && $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
    local -a debs=()
    [[ -x /usr/bin/chromium ]] || debs+=(chromium)      # the review-report test renders its HTML in it
    # the cluster tests (-m cluster): a real SLURM cluster, Open MPI, network namespaces as hosts
    command -v slurmctld >/dev/null || debs+=(slurm-wlm)
    command -v munged >/dev/null || debs+=(munge)
    command -v mpirun >/dev/null || debs+=(openmpi-bin)
    command -v ip >/dev/null || debs+=(iproute2)
    if [[ ${#debs[@]} -gt 0 ]]; then
      echo "[setup] installing Debian packages: ${debs[*]}"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${debs[@]}" >/dev/null
    fi
  fi
  export PATH="$PWD/$venv/bin:$PATH"
  # npm tarballs, real-image features and the classifier: $LDM_CACHE, else ~/.cache/ldm (as ldm-train run alone)
  export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"  # DeepSpeed ops
  export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  if ! "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    export DS_ACCELERATOR=cpu
  fi
}

cmd="${1:-}"
shift || true
case "$cmd" in
  demo) setup; exec "$venv/bin/ldm-demo" "$@" ;;
  # the GPU tests that can run on a CPU do (tests/gpu/conftest.py); LDM_GPU_TESTS_ON_CPU=0 leaves them out
  test)
    setup; export LDM_GPU_TESTS_ON_CPU="${LDM_GPU_TESTS_ON_CPU-1}"
    [[ $# -eq 0 ]] || exec "$venv/bin/python" -m pytest -q "$@"
    # the whole suite (what CI runs): the main tests, then the cluster tests (daemons, namespaces) in their own
    # session; pytest's exit code 5 (nothing collected) is a failure; the exit code is the first failure's
    status=0
    # a full disk shows up as tmp_path errors in unrelated tests: say so first
    local_tmp="${TMPDIR:-/tmp}"
    free_gib=$(df -Pk "$local_tmp" | awk 'NR == 2 {print int($4 / 1048576)}')
    if [[ "$free_gib" -lt 5 ]]; then
      echo "[test] warning: ${free_gib} GiB free in $local_tmp; the suite keeps up to about 3 GiB there (checkpoints," \
           "exports): below that tests fail with 'No space left on device'" >&2
    fi
    for marker in "not cluster" "cluster"; do
      echo "[test] pytest -m \"$marker\""
      rc=0
      "$venv/bin/python" -m pytest -q -m "$marker" || rc=$?
      if [[ $rc -eq 5 ]]; then echo "error: pytest -m \"$marker\" collected no tests" >&2; rc=1; fi
      [[ $status -ne 0 ]] || status=$rc
    done
    exit $status ;;
  setup) setup ;;
  *) echo "usage: ./run.sh demo [key=value ...] | ./run.sh test [pytest args] | ./run.sh setup" >&2; exit 2 ;;
esac
