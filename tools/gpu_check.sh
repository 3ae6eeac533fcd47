#!/usr/bin/env bash
# One GPU session's work in one go: build the extension, run the GPU test suites for each kernel
# family, then the benchmark. Every stage has its own time limit so a hang costs one stage, not the
# session. Logs go to the folder given as $1. (To compare variants of the kernels on the same
# card, use tools/ab.sh.)
#
#   tools/gpu_check.sh LOGDIR [bench arguments...]
#
# Environment: TEST_FILES (default: the GPU suites), PORTABLE_LIMIT / HOPPER_LIMIT / BENCH_LIMIT
# (seconds; 0 skips that test stage), HOPPER_SCHEDULES (default "split seesaw").
set -u
logs=$(mkdir -p "${1:?usage: tools/gpu_check.sh LOGDIR [bench args]}" && cd "$1" && pwd)
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1
test_files=${TEST_FILES:-tests/test_gpu.py tests/test_gpu_hardening.py}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$logs/gpu.txt"
echo "== build"
if ! (cd "$repo" && timeout 400 python3 -m pip install --no-build-isolation --no-deps . \
        > "$logs/build.log" 2>&1); then
  tail -40 "$logs/build.log"
  exit 1
fi
tail -1 "$logs/build.log"

# Run from outside the checkout so that `import jax_flashmla` finds the installed build.
cd /tmp || exit 1
run_tests() {  # name, time limit, pytest arguments...
  local name=$1 limit=$2
  shift 2
  [ "$limit" = 0 ] && return  # a limit of 0 skips the stage
  echo "== tests: $name"
  # shellcheck disable=SC2086
  timeout "$limit" python3 -m pytest $(printf "$repo/%s " $test_files) -q -p no:cacheprovider \
    "$@" > "$logs/tests-$name.log" 2>&1
  echo "exit $?"
  grep -E "^(FAILED|ERROR)" "$logs/tests-$name.log" | head -20
  tail -1 "$logs/tests-$name.log"
}
# The Hopper kernel has two schedules (split S for one 64-row tile, seesaw for more); the suite
# runs once with each forced, so both see every shape.
for schedule in ${HOPPER_SCHEDULES:-split seesaw}; do
  export JAX_FLASHMLA_HOPPER_SCHEDULE=$schedule
  run_tests "hopper-$schedule" "${HOPPER_LIMIT:-400}" -m gpu -k "hopper"
done
unset JAX_FLASHMLA_HOPPER_SCHEDULE
run_tests portable "${PORTABLE_LIMIT:-400}" -m gpu -k "not hopper"

if [ "$#" -gt 0 ]; then
  echo "== bench $*"
  timeout "${BENCH_LIMIT:-300}" python3 -m jax_flashmla.bench --json "$logs/bench.json" \
    --markdown "$logs/bench.md" "$@" > "$logs/bench.log" 2>&1
  echo "exit $?"
  sed -n '/^| b /,$p' "$logs/bench.log"
fi
