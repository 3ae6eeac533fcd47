#!/usr/bin/env bash
# Runs tools/sanitize_cases.py under compute-sanitizer's memcheck, racecheck and synccheck, one log
# per tool in LOGDIR, and prints each tool's summary line. Needs a CUDA GPU and jax_flashmla
# installed with its extension (tools/gpu_check.sh installs it).
#
#   tools/sanitize.sh LOGDIR [sanitize_cases.py arguments...]
#
# Environment: COMPUTE_SANITIZER (the binary), PYTHON, SANITIZE_LIMIT (seconds per tool, default
# 300), SANITIZE_TOOLS (default "memcheck racecheck synccheck"), SANITIZE_ALL_KERNELS=1 to check XLA's kernels too (much slower).
set -u
logs=$(mkdir -p "${1:?usage: tools/sanitize.sh LOGDIR [sanitize_cases.py args]}" && cd "$1" && pwd)
shift
repo=$(cd "$(dirname "$0")/.." && pwd)

sanitizer=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
if [ ! -x "$sanitizer" ]; then
  echo "compute-sanitizer not found; set COMPUTE_SANITIZER" >&2
  exit 2
fi

# Every XLA buffer gets its own cudaMalloc, so memcheck sees a read past one of our buffers instead
# of landing silently inside XLA's preallocated arena.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_PYTHON_CLIENT_ALLOCATOR=platform
# Launch kernels directly rather than through CUDA graphs, and skip GEMM autotuning: both keep the
# sanitized run short and its reports attributed to plain launches.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer= --xla_gpu_autotune_level=0"
export TF_CPP_MIN_LOG_LEVEL=1
export PYTHONUNBUFFERED=1

# All our kernels live in namespace jax_flashmla, so the substring matches their mangled names and
# nothing of XLA's; unmatched kernels still run, unchecked.
filter=(--kernel-name kns=jax_flashmla)
if [ "${SANITIZE_ALL_KERNELS:-0}" = 1 ]; then
  filter=()
fi

# Run from outside the checkout so that `import jax_flashmla` finds the installed build.
cd /tmp || exit 1
status=0
for tool in ${SANITIZE_TOOLS:-memcheck racecheck synccheck}; do
  timeout "${SANITIZE_LIMIT:-300}" "$sanitizer" --tool "$tool" --target-processes all \
    ${filter[@]+"${filter[@]}"} --print-limit 200 --error-exitcode 3 \
    "${PYTHON:-python3}" "$repo/tools/sanitize_cases.py" "$@" > "$logs/$tool.log" 2>&1
  code=$?
  [ "$code" -ne 0 ] && status=1
  # One summary per sanitized process; racecheck also writes a RACECHECK SUMMARY of its hazards.
  summary=$(grep -E "(ERROR|RACECHECK) SUMMARY" "$logs/$tool.log" | sed 's/^=* *//' | paste -sd ';' -)
  mismatches=$(grep -E "case\(s\) mismatched" "$logs/$tool.log")
  echo "$tool: exit $code (124 = timed out); ${summary:-no summary line}; ${mismatches:-no case summary}"
done
exit "$status"
