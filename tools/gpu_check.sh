#!/usr/bin/env bash
# One GPU session's work in one go: build the extension, run the GPU test suite for each kernel
# family, then the benchmark. Every stage has its own time limit so a hang costs one stage, not the
# session. Logs go to the folder given as $1 (created if missing).
#
#   tools/gpu_check.sh LOGDIR [bench arguments...]
set -u
logs=$(mkdir -p "${1:?usage: tools/gpu_check.sh LOGDIR [bench args]}" && cd "$1" && pwd)
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$logs/gpu.txt"
echo "== build"
if ! (cd "$repo" && timeout 400 python3 -m pip install --no-build-isolation --no-deps . \
        > "$logs/build.log" 2>&1); then
  tail -40 "$logs/build.log"
  exit 1
fi
tail -2 "$logs/build.log"

# Run from outside the checkout so that `import jax_flashmla` finds the installed build.
cd /tmp || exit 1
run_tests() {  # name, time limit, pytest arguments...
  local name=$1 limit=$2
  shift 2
  echo "== tests: $name"
  timeout "$limit" python3 -m pytest "$repo/tests" -q -p no:cacheprovider "$@" \
    > "$logs/tests-$name.log" 2>&1
  echo "exit $?"
  tail -4 "$logs/tests-$name.log"
}
run_tests portable "${PORTABLE_LIMIT:-200}" -m gpu -k "not hopper"
run_tests hopper "${HOPPER_LIMIT:-200}" -m gpu -k "hopper"

if [ "$#" -gt 0 ]; then
  echo "== bench $*"
  timeout "${BENCH_LIMIT:-300}" python3 -m jax_flashmla.bench --json "$logs/bench.json" \
    --markdown "$logs/bench.md" "$@" > "$logs/bench.log" 2>&1
  echo "exit $?"
  tail -30 "$logs/bench.log"
fi
