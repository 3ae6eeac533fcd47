#!/usr/bin/env bash
# Nsight Compute profile of one decode call per kernel family, to see what limits them: achieved
# DRAM bandwidth and tensor-pipe use (SpeedOfLight, ComputeWorkloadAnalysis), where warps stall
# (WarpStateStats, and per SASS instruction from SourceCounters), and the shared-memory and L2
# traffic (MemoryWorkloadAnalysis). Clocks are left as the card has them.
#
#   tools/profile_kernels.sh LOGDIR [batch seqlen_k heads_q seqlen_q]   (default 128 4096 128 2)
#
# Environment: PROFILE_KERNELS (default "hopper portable"), PROFILE_LIMIT (seconds per kernel).
# Writes LOGDIR/ncu-KERNEL-SHAPE.txt (the sections) and LOGDIR/sass-KERNEL-SHAPE.csv (per-instruction
# samples: the stall reasons of each SASS line).
set -u
logs=$(mkdir -p "${1:?usage: tools/profile_kernels.sh LOGDIR [b s_k h_q s_q]}" && cd "$1" && pwd)
shape=("${2:-128}" "${3:-4096}" "${4:-128}" "${5:-2}")
tag=$(IFS=-; echo "${shape[*]}")
cd /tmp || exit 1
for kernel in ${PROFILE_KERNELS:-hopper portable}; do
  report=/tmp/ncu-$kernel-$tag
  timeout "${PROFILE_LIMIT:-240}" ncu --clock-control none --kernel-name regex:mla_decode \
    --launch-skip 1 --launch-count 1 --section SpeedOfLight --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section LaunchStats \
    --section SourceCounters --import-source no -f -o "$report" \
    python3 - "$kernel" "${shape[@]}" > "$logs/ncu-run-$kernel-$tag.txt" 2>&1 <<'PY'
import sys

import jax

import jax_flashmla
from jax_flashmla.bench import Shape, make_problem

kernel, batch, seqlen_k, heads, seqlen_q = sys.argv[1], *map(int, sys.argv[2:])
problem = make_problem(Shape(batch, seqlen_k, heads, seqlen_q))
q, k_cache, table = problem.copies[0]
metadata, splits = jax_flashmla.get_mla_metadata(problem.cache_seqlens, seqlen_q * heads, 1)
decode = jax.jit(lambda *a: jax_flashmla.flash_mla_with_kvcache(
    *a, 512, metadata, splits, causal=True, implementation=kernel))
for _ in range(2):  # the first launch warms up; ncu skips it
    jax.block_until_ready(decode(q, k_cache, table, problem.cache_seqlens))
PY
  echo "== $kernel $tag (exit $?)"
  ncu -i "$report.ncu-rep" --print-details all > "$logs/ncu-$kernel-$tag.txt" 2>&1
  ncu -i "$report.ncu-rep" --page source --print-source sass --csv \
    > "$logs/sass-$kernel-$tag.csv" 2>&1
  grep -E "Duration|DRAM Throughput|Compute \(SM\) Throughput|Registers Per|Stall|Warp Cycles Per Issued|Tensor|Pipe" \
    "$logs/ncu-$kernel-$tag.txt" | head -40
done
