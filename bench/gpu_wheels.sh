#!/usr/bin/env bash
# Prepare the wheels bench/gpu_check.sh installs on a GPU machine with no network: the project's packages
# that machine lacks (deepspeed, webdataset, diffusers, open-clip-torch, ftfy and their small dependencies),
# at the versions of constraints.txt, for Python 3.12 on manylinux x86_64; pure-Python wheels where they exist.
#
#   bench/gpu_wheels.sh [DIR] [--python-version 3.12]     (DIR default: build/gpu-wheels)
#   bench/gpu_wheels.sh --stamp-only [DIR]                only (re)write DIR/COMMIT
#
# torch, CUDA, transformers, safetensors, numpy and pytest stay the machine's own. deepspeed is a source
# distribution: its wheel is built here (`pip wheel --no-deps --no-build-isolation`, ops left to JIT), which
# needs this venv's torch. Prints the folder's total size: what travels to the machine must stay under 64 MiB.
# DIR/COMMIT names this tree's commit (`git describe --always --dirty`): no .git travels with the tree, and
# bench/gpu_check.sh reports it from there; rewrite it with --stamp-only when the tree has moved on since.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

dir="build/gpu-wheels"
pyver="3.12"
stamp_only=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python-version) [[ $# -ge 2 ]] || { echo "error: --python-version needs a value" >&2; exit 2; }; pyver="$2"; shift 2 ;;
    --stamp-only) stamp_only=1; shift ;;
    -h|--help) awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; exit 0 ;;
    -*) echo "error: unknown option $1" >&2; exit 2 ;;
    *) dir="$1"; shift ;;
  esac
done
stamp() {
  mkdir -p "$dir"
  git describe --always --dirty --abbrev=12 >"$dir/COMMIT"
  echo "[wheels] $dir/COMMIT: $(cat "$dir/COMMIT")"
}
if [[ "$stamp_only" == 1 ]]; then
  stamp
  exit 0
fi

python="${PYTHON:-.venv/bin/python}"
[[ -x "$python" ]] || python="$(command -v python3)"
abi="cp${pyver//./}"

# what the GPU machine lacks, and what those need that a transformers/accelerate/timm machine may not have
packages=(webdataset braceexpand diffusers importlib-metadata zipp open-clip-torch ftfy wcwidth
          hjson msgpack ninja py-cpuinfo nvidia-ml-py einops pydantic pydantic-core annotated-types
          typing-inspection typing-extensions pyyaml)
pin() { sed -n "s/^$1==//p" constraints.txt; }
specs=()
for p in "${packages[@]}"; do
  v="$(pin "$p")"
  specs+=("$p${v:+==$v}")
done

mkdir -p "$dir"
rm -f "$dir"/*.whl
echo "[wheels] downloading ${#specs[@]} wheels for CPython $pyver (manylinux x86_64 or pure Python) into $dir"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$dir" \
  --python-version "$pyver" --implementation cp --abi "$abi" --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  "${specs[@]}"
ds="$(pin deepspeed)"
echo "[wheels] building deepspeed${ds:+ $ds} (source distribution; ops compiled at run time)"
DS_BUILD_OPS=0 "$python" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$dir" "deepspeed${ds:+==$ds}"

stamp
count="$(find "$dir" -name '*.whl' | wc -l)"
bytes="$(du -cb "$dir"/*.whl | tail -1 | cut -f1)"
echo "[wheels] $count wheels, $((bytes / 1024)) KiB in all ($dir)"
if [[ "$bytes" -gt $((64 * 1024 * 1024)) ]]; then
  echo "error: $dir is over 64 MiB" >&2
  exit 1
fi
